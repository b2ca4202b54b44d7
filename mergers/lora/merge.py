"""Several LoRAs into one: exact by concatenation, or by SVD to a chosen rank.

Per module, the merged change is Σ ratioᵢ · scaleᵢ · ΔWᵢ (ratio by block, as when applying them).

- **concatenation** (no rank given, or the summed ranks fit in it): up = [r₁s₁·up₁ | r₂s₂·up₂ | …],
  down = [down₁; down₂; …], alpha = the new rank. up @ down is then exactly the sum: the merged LoRA
  applied equals the LoRAs applied one after another. Plain LoRA/LoCon modules only.
- **SVD** (``rank=N`` or ``"auto"`` = the largest input rank): the best rank-N factors of the sum, with
  the relative error reported. Works for LoHa/LoKr too (the result is a LoRA/LoCon). The original's
  kohya-style sum of ups and downs (inexact) and its 0.99-quantile clamp are not reproduced.

Example:
    >>> result = merge_loras([parse_entry("a.safetensors:0.7"), parse_entry("b.safetensors:0.5")], "ab.safetensors")
    >>> result.method, result.max_error
    ('concat', 0.0)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from mergers.arch import Architecture
from mergers.engine import CancelToken, ProgressCallback, resolve_device
from mergers.errors import ArchitectureError, MergeCancelled, MergeError
from mergers.lora.apply import RECIPE_KEY, Resolver, lora_record, open_loras, resolve_lora_path
from mergers.lora.blocks import LoraEntry
from mergers.lora.formats import LoraFile, LoraModule
from mergers.lora.keys import Target
from mergers.lora.lowrank import Factors, low_rank, low_rank_of_product
from mergers.lora.match import family_label, lora_family, match_modules, reference_table
from mergers.writer import save_checkpoint

Rank = Union[int, str, None]  # None: concatenate; N: at most N; "auto": the largest input rank
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version


@dataclass(frozen=True)
class Part:
    """One LoRA's share of a merged module: its module and the ratio its block gets."""

    lora: LoraFile
    module: LoraModule
    ratio: float
    target: Target  # in the reference layout: gives the kernel size that LoHa/LoKr files flatten away

    @property
    def shape(self) -> tuple[int, ...]:
        """ΔW's shape as the layer's: (out, in) or (out, in, kh, kw)."""
        delta = self.module.delta_shape(self.lora.shapes)
        kernel = self.target.shape[2:]
        return (delta[0], math.prod(delta[1:]) // math.prod(kernel), *kernel)

    @property
    def concatenable(self) -> bool:
        return self.module.kind == "lora" and "mid" not in self.module.parts


@dataclass(frozen=True)
class LoraMergeResult:
    """What a LoRA merge or extraction wrote, with its SVD errors (0 when exact)."""

    path: Path
    method: str  # "concat", "svd" or "concat+svd"
    rank: int
    modules: int
    mean_error: float
    max_error: float
    seconds: float
    metadata: dict[str, str]

    @property
    def summary(self) -> str:
        error = ("exact" if self.max_error == 0
                 else f"relative error mean {self.mean_error:.4f}, max {self.max_error:.4f}")
        return f"{self.path.name}: {self.modules} modules, rank ≤ {self.rank} by {self.method} ({error}), " \
               f"{self.seconds:.1f} s"


def merge_loras(entries: Sequence[LoraEntry], output: str | Path, *, rank: Rank = None,
                resolve: Resolver = resolve_lora_path, device: Optional[str] = None, dtype: Optional[str] = None,
                overwrite: bool = False, on_progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> LoraMergeResult:
    """Merge the LoRAs of ``entries`` into one LoRA file at ``output``.

    Example:
        >>> merge_loras([parse_entry("a.safetensors:1"), parse_entry("b.safetensors:1")], "ab.safetensors", rank=32)
    """
    started = time.perf_counter()
    compute = resolve_device(device)
    with open_loras(entries, resolve) as loras:
        family = common_family(loras)
        modules = module_parts(loras, family)
        limit = auto_rank(loras) if rank == "auto" else _checked_rank(rank)
        tensors, methods, errors = {}, set(), []
        for done, (name, parts) in enumerate(modules.items(), 1):
            if cancel is not None and cancel.is_set():
                raise MergeCancelled("stopped; nothing was written")
            factors, method = merge_module(parts, limit, compute)
            tensors.update(kohya_tensors(name, factors))
            methods.add(method)
            errors.append(factors.error)
            if on_progress is not None:
                on_progress(done, len(modules), name)
        method = "+".join(sorted(methods)) or "concat"
        out_rank = max((t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")), default=0)
        record = {"operation": "merge", "method": method, "rank": rank, "loras": [lora_record(e, f) for e, f in loras],
                  "max_error": max(errors, default=0.0)}
        metadata = merged_metadata(loras, family, out_rank, Path(output).stem, record)
        save_checkpoint(output, tensors, dtype=dtype or _dtype_name(loras), metadata=metadata, overwrite=overwrite,
                        protect=[lora.path for _, lora in loras])
    return LoraMergeResult(Path(output), method, out_rank, len(modules), _mean(errors), max(errors, default=0.0),
                           time.perf_counter() - started, metadata)


def common_family(loras: Sequence[tuple[LoraEntry, LoraFile]]) -> str:
    """The architecture all the LoRAs are for; ArchitectureError naming the odd one out."""
    families = {lora.name: lora_family(lora) for _, lora in loras}
    first_name, first = next(iter(families.items()))
    for name, family in families.items():
        if family != first:
            raise ArchitectureError(f"{name} is a {family_label(family)} LoRA, {first_name} is "
                                    f"{family_label(first)}: LoRAs of different models cannot be merged")
    return first


def module_parts(loras: Sequence[tuple[LoraEntry, LoraFile]], family: str) -> dict[str, list[Part]]:
    """Module name → each LoRA's share (ratio by the block of the key it changes; ratio 0 left out)."""
    table, layout = reference_table(family), Architecture(family).layout
    modules: dict[str, list[Part]] = {}
    for entry, lora in loras:
        for name, target in match_modules(lora, table, where=family_label(family), check_shapes=False).items():
            ratio = entry.ratio_for_key(target.key, layout)
            if ratio != 0:
                modules.setdefault(name, []).append(Part(lora, lora.modules[name], ratio, target))
    return modules


def merge_module(parts: Sequence[Part], limit: Optional[int], device: torch.device) -> tuple[Factors, str]:
    """Merged factors of one module and how they were made ("concat" or "svd")."""
    if all(part.concatenable for part in parts):
        ups, downs = zip(*(scaled_factors(part, device) for part in parts))
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        shape = parts[0].shape
        if limit is None or down.shape[0] <= limit:
            return _concatenated(up, down, shape), "concat"
        return low_rank_of_product(up, down, limit, shape), "svd"
    if limit is None:
        kinds = sorted({part.module.kind for part in parts if not part.concatenable})
        raise MergeError(f"module {parts[0].module.name}: {', '.join(kinds)} modules cannot be concatenated; "
                         "give a rank (or auto) to merge them by SVD")
    total = sum(part.lora.delta(part.module, device=device, scale=part.ratio).reshape(part.shape)
                for part in parts)
    return low_rank(total, limit), "svd"


def scaled_factors(part: Part, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio · scale · up, down) of a plain LoRA module, flattened to 2-D."""
    reader, names = part.lora.checkpoint, part.module.parts
    up = reader[names["up"]].to(device=device, dtype=torch.float32)
    down = reader[names["down"]].to(device=device, dtype=torch.float32)
    scale = part.lora.scale(part.module) * part.ratio
    return up.reshape(up.shape[0], -1) * scale, down.reshape(down.shape[0], -1)


def kohya_tensors(name: str, factors: Factors) -> dict[str, torch.Tensor]:
    """The three tensors kohya stores for a module: up, down and alpha = rank (scale 1)."""
    return {f"{name}.lora_down.weight": factors.down.cpu(), f"{name}.lora_up.weight": factors.up.cpu(),
            f"{name}.alpha": torch.tensor(float(factors.rank))}


def auto_rank(loras: Sequence[tuple[LoraEntry, LoraFile]]) -> int:
    """The largest rank among the inputs (the original's "auto")."""
    ranks = [rank for _, lora in loras for rank in lora.ranks]
    if not ranks:
        raise MergeError("auto rank: no input has a rank (full-matrix LoRAs); give one")
    return max(ranks)


def merged_metadata(loras: Sequence[tuple[LoraEntry, LoraFile]], family: str, rank: int, output_name: str,
                    record: Mapping) -> dict[str, str]:
    """kohya's ``ss_*`` keys for the result (training tags summed over the inputs) and our recipe."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": BASE_MODEL_VERSIONS[family], "ss_output_name": output_name,
                RECIPE_KEY: json.dumps(record, ensure_ascii=False)}
    tags = merged_tag_frequency([lora.metadata for _, lora in loras])
    if tags:
        metadata["ss_tag_frequency"] = json.dumps(tags, ensure_ascii=False)
    return metadata


def merged_tag_frequency(metadatas: Sequence[Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` ({dataset: {tag: count}}) of several files, counts summed.

    Example:
        >>> merged_tag_frequency([{"ss_tag_frequency": '{"d": {"cat": 2}}'}, {"ss_tag_frequency": '{"d": {"cat": 1}}'}])
        {'d': {'cat': 3}}
    """
    merged: dict[str, dict[str, int]] = {}
    for metadata in metadatas:
        try:
            datasets = json.loads(metadata.get("ss_tag_frequency", "{}"))
        except ValueError:
            continue  # a hand-edited, unreadable tag list is left out, not fatal
        for dataset, tags in (datasets.items() if isinstance(datasets, dict) else ()):
            counts = merged.setdefault(dataset, {})
            for tag, count in (tags.items() if isinstance(tags, dict) else ()):
                if isinstance(count, (int, float)):
                    counts[tag] = counts.get(tag, 0) + int(count)
    return merged


def _concatenated(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> Factors:
    if len(shape) == 4:
        up, down = up[:, :, None, None], down.reshape(down.shape[0], *shape[1:])
    return Factors(up.contiguous(), down.contiguous(), 0.0, 0.0)


def _checked_rank(rank: Rank) -> Optional[int]:
    if rank is None:
        return None
    try:
        value = int(rank)
    except (TypeError, ValueError):
        raise MergeError(f"rank {rank!r}: give a whole number ≥ 1, or auto") from None
    if value < 1:
        raise MergeError(f"rank {rank!r}: give a whole number ≥ 1, or auto")
    return value


def _dtype_name(loras: Sequence[tuple[LoraEntry, LoraFile]]) -> str:
    """The first input's precision (LoRA outputs default to their inputs')."""
    lora = loras[0][1]
    first = next(iter(lora.modules.values()))
    dtype = lora.checkpoint.dtype(next(name for part, name in first.parts.items() if part != "alpha"))
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
