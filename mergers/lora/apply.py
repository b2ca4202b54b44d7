"""LoRAs into a checkpoint, streamed: W' = W + Σ ratio · scale · ΔW, key by key.

The checkpoint is read one tensor at a time; each key a LoRA touches gets its changes added in float32
on the compute device (CUDA when there is one) and is cast back to its own dtype; the other keys pass
through. The result goes to a new file (with a ``supermerger_lora`` recipe in its metadata) or, from the
tab, into the loaded model as a layer on top of the merge there (``lora_layer``, ``MergeSession.apply_layer``).

Example:
    >>> entries = [parse_entry("style.safetensors:0.8:OUTALL")]
    >>> result = loras_to_checkpoint("sd15.safetensors", entries, "sd15_style.safetensors")
    >>> result.changed
    264
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mergers.arch.detect import detect_architecture, require_lora_support
from mergers.checkpoint import Checkpoint, open_checkpoint
from mergers.engine import CancelToken, ProgressCallback, resolve_device
from mergers.errors import CheckpointError, MergeCancelled, MergeError
from mergers.lora.blocks import LoraEntry
from mergers.lora.formats import LoraFile, LoraModule, open_lora
from mergers.lora.keys import QKV, Target, module_table
from mergers.lora.match import fit_delta, match_modules
from mergers.stack import Change, Layer
from mergers.writer import BackgroundWrites, SafetensorsWriter, TensorSpec, cast_for_output, output_dtype

RECIPE_KEY = "supermerger_lora"
# Metadata of the source that describes another file (its own merge recipe): not carried over.
DROPPED_METADATA_PREFIXES = ("supermerger_", "sd_merge_")
HASH_SLACK = 1024  # header room for the real sha256 that replaces a same-length placeholder

Resolver = Callable[[str], Path]


@dataclass(frozen=True)
class Contribution:
    """One LoRA module's change to one checkpoint key, with the ratio its block gets."""

    lora: LoraFile
    module: LoraModule
    target: Target
    ratio: float


@dataclass(frozen=True)
class LoraResult:
    """What writing a LoRA-applied checkpoint did."""

    path: Path
    changed: int
    architecture: str
    metadata: dict[str, str]
    seconds: float


def resolve_lora_path(name: str) -> Path:
    """The default resolver: the name is a path to a LoRA file."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{name}: no such LoRA file")
    return path


@contextlib.contextmanager
def open_loras(entries: Sequence[LoraEntry], resolve: Resolver = resolve_lora_path
               ) -> Iterator[list[tuple[LoraEntry, LoraFile]]]:
    """Open each entry's LoRA file, closing them afterwards."""
    if not entries:
        raise MergeError("no LoRA given: name at least one as name:ratio[:blocks]")
    with contextlib.ExitStack() as stack:
        yield [(entry, stack.enter_context(open_lora(resolve(entry.name)))) for entry in entries]


def plan_contributions(loras: Sequence[tuple[LoraEntry, LoraFile]], shapes: Mapping[str, Sequence[int]], *,
                       metadata: Optional[Mapping[str, str]] = None, source: str = "the checkpoint"
                       ) -> tuple[dict[str, list[Contribution]], str]:
    """Checkpoint key → the LoRA changes it gets (ratio 0 left out), and the checkpoint's architecture label.

    Every module of every LoRA must fit the checkpoint, or ArchitectureError names the misfits.
    """
    arch = detect_architecture(shapes, metadata, source=source)
    require_lora_support(arch, source=source)
    table = module_table(shapes)
    plan: dict[str, list[Contribution]] = {}
    for entry, lora in loras:
        for name, target in match_modules(lora, table, where=f"{source} ({arch.label})").items():
            ratio = entry.ratio_for_key(target.key, arch.layout)
            if ratio != 0:
                plan.setdefault(target.key, []).append(Contribution(lora, lora.modules[name], target, ratio))
    return plan, arch.label


def add_contributions(weight: torch.Tensor, contributions: Sequence[Contribution],
                      device: torch.device) -> torch.Tensor:
    """W + Σ ratio · scale · ΔW, computed in float32 on ``device``, returned in W's dtype on the CPU."""
    result = weight.to(device=device, dtype=torch.float32, copy=True)
    for item in contributions:
        delta = item.lora.delta(item.module, device=device, scale=item.ratio)
        if item.target.part is None:
            result += fit_delta(delta, tuple(result.shape))
        else:  # q, k or v: one third of OpenCLIP's stacked in_proj rows
            rows = result.shape[0] // len(QKV)
            start = item.target.part * rows
            result[start:start + rows] += fit_delta(delta, item.target.delta_shape)
    return result.to(device="cpu", dtype=weight.dtype)


def stream_with_loras(base: Mapping[str, torch.Tensor], plan: Mapping[str, Sequence[Contribution]], *,
                      device: Optional[str] = None, keys: Optional[Sequence[str]] = None,
                      on_progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` (default: only the changed ones) of ``base`` with the LoRAs added.

    Example:
        >>> for key, tensor in stream_with_loras(ckpt, plan): live[key].copy_(tensor)
    """
    compute = resolve_device(device)
    order = list(plan) if keys is None else list(keys)
    for done, key in enumerate(order, 1):
        if cancel is not None and cancel.is_set():
            raise MergeCancelled("stopped; nothing was kept")
        tensor = base[key]
        yield key, add_contributions(tensor, plan[key], compute) if key in plan else tensor
        if on_progress is not None:
            on_progress(done, len(order), key)


def lora_layer(entries: Sequence[LoraEntry], shapes: Mapping[str, Sequence[int]], *,
               resolve: Resolver = resolve_lora_path, metadata: Optional[Mapping[str, str]] = None,
               source: str = "the loaded model", device: Optional[str] = None) -> Layer:
    """The LoRAs of ``entries`` as a layer for the loaded model (``MergeSession.apply_layer``): each key they
    touch gets W + Σ ratio · scale · ΔW on whatever is below, as ``loras_to_checkpoint`` bakes it into a file.
    Checked now (every LoRA fits ``shapes``, else ArchitectureError); the files are read again when applied.

    Example:
        >>> session.apply_layer(lora_layer(parse_entries("style:0.8"), ckpt.shapes, resolve=resolve)).stack
    """
    with open_loras(entries, resolve) as loras:
        plan, _ = plan_contributions(loras, shapes, metadata=metadata, source=source)
    label = ", ".join(entry.as_text() for entry in entries)

    @contextlib.contextmanager
    def opened() -> Iterator[Change]:
        compute = resolve_device(device)
        with open_loras(entries, resolve) as loras:
            contributions, _ = plan_contributions(loras, shapes, metadata=metadata, source=source)
            yield lambda key, weight: add_contributions(weight, contributions[key], compute)

    return Layer("lora", label, frozenset(plan), opened, {"SuperMerger LoRA": label})


def loras_to_checkpoint(checkpoint: str | Path, entries: Sequence[LoraEntry], output: str | Path, *,
                        resolve: Resolver = resolve_lora_path, device: Optional[str] = None,
                        dtype: Optional[str] = None, overwrite: bool = False,
                        on_progress: Optional[ProgressCallback] = None,
                        cancel: Optional[CancelToken] = None) -> LoraResult:
    """Write ``checkpoint`` with the LoRAs of ``entries`` added to ``output`` (atomically, streamed).

    Example:
        >>> loras_to_checkpoint("sd15.safetensors", [parse_entry("x.safetensors:0.5")], "out.safetensors").changed
        264
    """
    started = time.perf_counter()
    target_dtype = output_dtype(dtype)
    with open_checkpoint(checkpoint) as base, open_loras(entries, resolve) as loras:
        plan, label = plan_contributions(loras, base.shapes, metadata=base.metadata, source=base.name)
        placeholder = "0" * 64 if base.hash_while_reading() else None
        metadata = lora_checkpoint_metadata(base, loras, label, dtype, base_sha256=placeholder)
        specs = [TensorSpec(key, _cast(base.dtype(key), target_dtype), base.shape(key)) for key in base]
        protect = [base.path, *(lora.path for _, lora in loras)]
        with SafetensorsWriter(output, specs, metadata=metadata, overwrite=overwrite, protect=protect,
                               reserve=HASH_SLACK if placeholder else 0) as out:
            with BackgroundWrites(out) as writes:
                for key, tensor in stream_with_loras(base, plan, device=device, keys=list(base),
                                                     on_progress=on_progress, cancel=cancel):
                    writes.write(key, cast_for_output(tensor, target_dtype))
            if placeholder:  # every tensor was read, so the running hash is complete
                metadata = lora_checkpoint_metadata(base, loras, label, dtype)
                out.rewrite_metadata(metadata)
    return LoraResult(Path(output), len(plan), label, metadata, time.perf_counter() - started)


def lora_checkpoint_metadata(base: Checkpoint, loras: Sequence[tuple[LoraEntry, LoraFile]], label: str,
                             dtype: Optional[str], *, base_sha256: Optional[str] = None) -> dict[str, str]:
    """The source's own metadata (less its merge recipes) plus our ``supermerger_lora`` recipe."""
    kept = {k: v for k, v in base.metadata.items() if not k.startswith(DROPPED_METADATA_PREFIXES)}
    recipe = {
        "operation": "to_checkpoint",
        "checkpoint": {"name": base.name, "sha256": base_sha256 or base.sha256()},
        "architecture": label,
        "loras": [lora_record(entry, lora) for entry, lora in loras],
        "dtype": dtype,
    }
    return {**kept, "format": "pt", RECIPE_KEY: json.dumps(recipe, ensure_ascii=False)}


def lora_record(entry: LoraEntry, lora: LoraFile) -> dict:
    """How a recipe names one LoRA: file, hash, ratio and the block weights as numbers."""
    record = {"name": lora.name, "sha256": lora.checkpoint.sha256(), "ratio": entry.ratio}
    if entry.block_values is not None:
        record["blocks"] = entry.blocks
        record["block_values"] = dict(entry.block_values)
    return record


def _cast(dtype: torch.dtype, target: Optional[torch.dtype]) -> torch.dtype:
    return cast_for_output(torch.empty((), dtype=dtype), target).dtype
