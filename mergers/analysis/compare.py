"""Compare two checkpoints key by key, streamed, and sum the figures up per block and per component.

Each key both models hold (same shape, floating point, part of the text encoder, U-Net or VAE) is
read once from each file, in model A's file order, on a reader thread a bounded number of bytes
ahead; its sums (:mod:`mergers.analysis.stats`) are kept and the tensors dropped. No model is ever
whole in memory. With a third model, a merge M of A and B, each key also gets the least-squares
t of M − A onto B − A: "how much of B is in this merge", per key and per block.

Block figures follow the original SuperMerger's Analysis tab (``calccosinedif``): the mean and the
minimum of the keys' cosines, and the cosine of the block's ``attn2.to_out.0.weight`` (the mean of
them where SDXL blocks have several). Norms, the relative L2 distance and t are pooled: the block
counts as one long vector. The original prints cosines ×100; here they are plain, in [−1, 1].

Example:
    >>> result = compare_models("a.safetensors", "b.safetensors")
    >>> [(row["name"], round(row["cosine"], 4)) for row in result.rows][:2]
    [('BASE', 0.9981), ('IN00', 0.9874)]
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergers.analysis.stats import FitSums, PairSums, fit_sums, pair_sums
from mergers.arch import block_ids, block_of, detect_architecture, layout_named, require_supported
from mergers.checkpoint import Checkpoint, open_checkpoint
from mergers.engine import CancelToken, ProgressCallback
from mergers.engine import _Prefetcher as Prefetcher
from mergers.errors import ArchitectureError, MergeCancelled, MergeError

BY = ("block", "key")
# Key prefixes of each component, in the order the components are reported.
COMPONENT_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text encoder", ("cond_stage_model.", "conditioner.", "text_encoders.")),
    ("U-Net", ("model.diffusion_model.",)),
    ("VAE", ("first_stage_model.", "vae.")),
)
# Keys outside every prefix are buffers and EMA copies in SD files; in bare diffusion files (Flux's
# double_blocks.0…, Qwen-Image, automatic layouts) they are the diffusion model itself, reported as "U-Net".
NOT_DIFFUSION = ("model_ema.", "model_sampling.")
VAE_BLOCK = "VAE"  # the original's Analysis tab reports the VAE as a block of its own, not as BASE
ATTN2_KEY = "attn2.to_out.0.weight"  # the original's "attn2" block value
GROUP_STATISTICS = ("cosine", "cosine_min", "cosine_attn2", "relative_l2", "norm_a", "norm_b")
FIT_STATISTICS = ("coefficient", "alignment")
# Reading ahead only has to cover the next key or two: the sums of a key take less time than reading
# it. The engine's read-ahead budget (plus its buffer pool of the same size) put peak RSS at 1.1 GB when it was 256 MB.
READAHEAD_BYTES = 64 * 1024 * 1024
CSV_DIGITS = 8  # significant digits: a cosine of 0.99999812 keeps what tells it from 1


@dataclass(frozen=True)
class KeyResult:
    """One key's place (block, component) and its sums."""

    key: str
    block: str
    component: str
    shape: tuple[int, ...]
    sums: PairSums
    fit: FitSums | None = None


@dataclass(frozen=True)
class Comparison:
    """The figures of one comparison: per key, per block and per component.

    ``rows`` are the blocks or the keys, as ``by`` asks; both are always kept, so a view can switch.
    ``skipped`` names each key that was not compared, with the reason.
    """

    model_a: str
    model_b: str
    architecture: str
    layout: str
    by: str
    keys: tuple[dict, ...]
    blocks: tuple[dict, ...]
    components: tuple[dict, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    model_merged: str | None = None
    seconds: float = 0.0

    @property
    def rows(self) -> tuple[dict, ...]:
        return self.blocks if self.by == "block" else self.keys

    @property
    def statistics(self) -> tuple[str, ...]:
        """The statistics a block row carries, for charts and menus."""
        return GROUP_STATISTICS + (FIT_STATISTICS if self.model_merged else ())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: models, architecture, ``by``, its rows, the components and the skipped keys.

        Example:
            >>> json.dumps(compare_models("a.safetensors", "b.safetensors").to_dict())
        """
        data = {"model_a": self.model_a, "model_b": self.model_b, "architecture": self.architecture,
                "by": self.by, "rows": [dict(row) for row in self.rows],
                "components": [dict(row) for row in self.components],
                "skipped": [{"key": key, "reason": reason} for key, reason in self.skipped]}
        if self.model_merged:
            data["model_merged"] = self.model_merged
        return data


def compare_models(path_a: str | os.PathLike, path_b: str | os.PathLike, *, by: str = "block",
                   on_progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None) -> Comparison:
    """How alike two checkpoints are: cosine, relative L2 and norms per key, block and component.

    ``on_progress(done, total, key)`` is called after each key; ``cancel.is_set()`` stops the run
    (MergeCancelled). Errors name the file or key at fault.

    Example:
        >>> result = compare_models("a.safetensors", "b.safetensors", by="key")
        >>> result.rows[0]["name"], result.rows[0]["cosine"]
    """
    return _compare((path_a, path_b), by, on_progress, cancel)


def compare_merge(path_a: str | os.PathLike, path_b: str | os.PathLike, path_merged: str | os.PathLike, *,
                  by: str = "block", on_progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> Comparison:
    """:func:`compare_models` of A and B, plus how much of B the merge ``path_merged`` holds.

    Each row gets ``coefficient`` (least-squares t of M − A onto B − A: a weight sum at alpha 0.3
    reads ≈ 0.3) and ``alignment`` (cos(M − A, B − A): 1 when M lies on the line from A to B).

    Example:
        >>> rows = compare_merge("a.safetensors", "b.safetensors", "ab_0.3.safetensors").rows
        >>> round(rows[1]["coefficient"], 2)
        0.3
    """
    return _compare((path_a, path_b, path_merged), by, on_progress, cancel)


def _compare(paths: Sequence, by: str, on_progress: ProgressCallback | None,
             cancel: CancelToken | None) -> Comparison:
    if by not in BY:
        raise MergeError(f"unknown grouping by={by!r}; use 'block' or 'key'")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        models = [stack.enter_context(open_checkpoint(path)) for path in paths]
        arch = _common_architecture(models)
        keys, skipped = plan_keys(models, bare_keys=_bare_keys(arch.layout))
        results = _stream(models, keys, arch.layout, on_progress, cancel)
    return build_comparison(results, models=[m.name for m in models], architecture=arch.label,
                            layout=arch.layout, by=by, skipped=skipped,
                            seconds=time.perf_counter() - started)


def _common_architecture(models: Sequence[Checkpoint]):
    """Model A's architecture; the others must be of the same family (an inpainting variant is fine)."""
    archs = [detect_architecture(m.shapes, m.metadata, source=m.name) for m in models]
    require_supported(archs[0], source=models[0].name)
    for model, arch in zip(models[1:], archs[1:]):
        if arch.family != archs[0].family:
            raise ArchitectureError(f"{models[0].name} is {archs[0].label} but {model.name} is {arch.label}: "
                                    "only models of one architecture can be compared")
    return archs[0]


def _bare_keys(layout: str) -> bool:
    """Whether keys without a component prefix belong to the diffusion model (every layout but SD1/SDXL's)."""
    return not layout_named(layout).name_needs_model


def plan_keys(models: Sequence[Checkpoint], *, bare_keys: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """The keys to compare, in A's file order, and (key, reason) for each key left out.

    Example:
        >>> keys, skipped = plan_keys([open_checkpoint("a.safetensors"), open_checkpoint("b.safetensors")])
    """
    a, others = models[0], models[1:]
    keys, skipped = [], []
    for key in a:
        reason = _skip_reason(key, a, others, bare_keys)
        if reason:
            skipped.append((key, reason))
        else:
            keys.append(key)
    roles = ("B", "the merge")
    for role, model in zip(roles, others):
        skipped += [(key, f"only in {role} ({model.name})") for key in model if key not in a]
    return keys, skipped


def _skip_reason(key: str, a: Checkpoint, others: Sequence[Checkpoint], bare_keys: bool) -> str | None:
    if component_of(key, bare_keys=bare_keys) is None:
        return "not part of the text encoder, U-Net or VAE (EMA copy or buffer)"
    if not a.dtype(key).is_floating_point:
        return f"not floating point ({str(a.dtype(key)).replace('torch.', '')})"
    for model in others:
        if key not in model:
            return f"missing in {model.name}"
        if model.shape(key) != a.shape(key):
            return f"shape {list(a.shape(key))} in {a.name} but {list(model.shape(key))} in {model.name}"
    return None


def component_of(key: str, *, bare_keys: bool = False) -> str | None:
    """"text encoder", "U-Net" or "VAE" for a checkpoint key, None for anything else (EMA, buffers).

    Example:
        >>> component_of("first_stage_model.decoder.conv_in.weight")
        'VAE'
    """
    for component, prefixes in COMPONENT_PREFIXES:
        if key.startswith(prefixes):
            return component
    return "U-Net" if bare_keys and not key.startswith(NOT_DIFFUSION) else None


def analysis_block(key: str, layout: str) -> str:
    """The block a key is reported under: the merge block (``block_of``), the VAE as "VAE".

    Example:
        >>> analysis_block("model.diffusion_model.middle_block.1.proj_in.weight", "sd1")
        'M00'
    """
    if component_of(key) == "VAE":
        return VAE_BLOCK
    return block_of(key, layout) or "BASE"  # SDXL's "Not Merge" text-encoder scalars belong with BASE


def block_names(layout: str) -> tuple[str, ...]:
    """The blocks of a comparison's rows, in order: the layout's blocks, then the VAE."""
    return block_ids(layout) + (VAE_BLOCK,)


def _stream(models: Sequence[Checkpoint], keys: list[str], layout: str,
            on_progress: ProgressCallback | None, cancel: CancelToken | None) -> list[KeyResult]:
    results = []

    def reads(key: str) -> list:
        return [(model, key) for model in models]

    with Prefetcher(keys, reads, READAHEAD_BYTES) as reader:
        for done, (key, tensors) in enumerate(reader, 1):
            if cancel is not None and cancel.is_set():
                raise MergeCancelled(f"analysis stopped after {done - 1} of {len(keys)} keys")
            results.append(key_result(key, tensors, layout))
            if on_progress is not None:
                on_progress(done, len(keys), key)
    return results


def key_result(key: str, tensors: Sequence, layout: str) -> KeyResult:
    """The sums of one key from its tensors in A, B (and the merge).

    Example:
        >>> key_result("model.diffusion_model.out.2.weight", [a, b], "sd1").block
        'OUT11'
    """
    a, b = tensors[0], tensors[1]
    fit = fit_sums(a, b, tensors[2]) if len(tensors) > 2 else None
    return KeyResult(key, analysis_block(key, layout), component_of(key, bare_keys=_bare_keys(layout)) or "", tuple(a.shape),
                     pair_sums(a, b), fit)


def build_comparison(results: Sequence[KeyResult], *, models: Sequence[str], architecture: str, layout: str,
                     by: str = "block", skipped: Iterable[tuple[str, str]] = (),
                     seconds: float = 0.0) -> Comparison:
    """Key, block and component rows from the keys' results.

    Example:
        >>> build_comparison([key_result(k, [a[k], b[k]], "sd1") for k in keys], models=["a", "b"],
        ...                  architecture="SD1.x", layout="sd1").blocks[0]["name"]
        'BASE'
    """
    by_block = _grouped(results, lambda r: r.block, block_names(layout))
    by_component = _grouped(results, lambda r: r.component, [c for c, _ in COMPONENT_PREFIXES])
    return Comparison(
        model_a=models[0], model_b=models[1], model_merged=models[2] if len(models) > 2 else None,
        architecture=architecture, layout=layout, by=by,
        keys=tuple(key_row(r) for r in results),
        blocks=tuple(group_row(name, group) for name, group in by_block.items()),
        components=tuple(group_row(name, group) for name, group in by_component.items()),
        skipped=tuple(skipped), seconds=seconds)


def _grouped(results: Sequence[KeyResult], group_of: Callable[[KeyResult], str],
             order: Sequence[str]) -> dict[str, list[KeyResult]]:
    """Results by group, in ``order``; groups with no keys are left out."""
    groups: dict[str, list[KeyResult]] = {name: [] for name in order}
    for result in results:
        groups.setdefault(group_of(result), []).append(result)
    return {name: group for name, group in groups.items() if group}


def key_row(result: KeyResult) -> dict[str, Any]:
    """One key's row: name, block, component, shape and its statistics."""
    sums = result.sums
    row = {"name": result.key, "block": result.block, "component": result.component, "shape": list(result.shape),
           "cosine": sums.cosine, "relative_l2": sums.relative_l2, "norm_a": sums.norm_a, "norm_b": sums.norm_b}
    if result.fit is not None:
        row.update(coefficient=result.fit.coefficient, alignment=result.fit.alignment)
    return row


def group_row(name: str, results: Sequence[KeyResult]) -> dict[str, Any]:
    """A block's or component's row: the keys' mean and minimum cosine, attn2's cosine, pooled figures."""
    cosines = [r.sums.cosine for r in results]
    attn2 = [r.sums.cosine for r in results if r.key.endswith(ATTN2_KEY)]
    pooled = sum((r.sums for r in results), PairSums())
    row = {"name": name, "keys": len(results), "cosine": statistics.fmean(cosines), "cosine_min": min(cosines),
           "cosine_attn2": statistics.fmean(attn2) if attn2 else None, "relative_l2": pooled.relative_l2,
           "norm_a": pooled.norm_a, "norm_b": pooled.norm_b}
    fits = [r.fit for r in results if r.fit is not None]
    if fits:
        fit = sum(fits, FitSums())
        row.update(coefficient=fit.coefficient, alignment=fit.alignment)
    return row


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV with a header line; shapes as ``320x4x3x3``, missing values empty.

    Example:
        >>> csv_text([{"name": "IN00", "cosine": 0.5}])
        'name,cosine\\r\\nIN00,0.5\\r\\n'
    """
    columns = list(dict.fromkeys(column for row in rows for column in row))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, f".{CSV_DIGITS}g")
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)
