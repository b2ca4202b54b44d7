"""What a merge will cost, from the file headers alone: bytes moved, peak RAM/VRAM, time.

The engine (mergers/engine.py) reads ahead at most ``DEFAULT_READAHEAD_BYTES`` of input
while it computes one key, and the writer queues at most ``WRITE_QUEUE_DEPTH`` results, so
peak RAM is that budget plus the largest key's working set (its inputs, their fp32 copies
for fp32 methods and fp8 inputs, the result) plus the queued results. A chained input computes its key in
the reader thread, so its working set adds on top. Time is the bytes read and written at a
stated disk speed: merges here run at the disk's pace (bench/results.md: 1.0–1.2× the I/O
floor), so compute is left out.

Example:
    >>> with open_sources(recipe) as sources:
    ...     print(estimate(recipe, sources).text())
    estimate: reads 4.27 GB, writes 2.13 GB; peak RAM ≈ 0.43 GB; ≈ 16 s at 400 MB/s
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergers.chain import RecipeCheckpoint
from mergers.checkpoint import Checkpoint
from mergers.engine import DEFAULT_READAHEAD_BYTES, FP8_DTYPES, STRETCH, resolve_device, step_inputs
from mergers.plan import KeyStep, MergePlan, Sources, plan_merge
from mergers.recipe import Recipe

# The bench machine's measured I/O floor (bench/results.md, SD1.5: 6.4 GB moved in 16 s).
DEFAULT_DISK_BYTES_PER_S = 400e6
WRITE_QUEUE_DEPTH = 2  # mergers/writer.py BackgroundWrites' default depth
FP32_BYTES = 4


@dataclass(frozen=True)
class Estimate:
    """The cost of one merge, before it runs."""

    read_bytes: int
    write_bytes: int
    peak_ram_bytes: int
    peak_vram_bytes: int  # 0 when merging on the CPU
    seconds: float
    disk_bytes_per_s: float

    def text(self) -> str:
        """One line for the CLI and the tab."""
        vram = f", VRAM ≈ {_gb(self.peak_vram_bytes)}" if self.peak_vram_bytes else ""
        return (f"estimate: reads {_gb(self.read_bytes)}, writes {_gb(self.write_bytes)}; "
                f"peak RAM ≈ {_gb(self.peak_ram_bytes)}{vram}; ≈ {self.seconds:.0f} s at "
                f"{self.disk_bytes_per_s / 1e6:.0f} MB/s")


def estimate(recipe: Recipe, sources: Sources, *, device: Optional[str] = None,
             disk_bytes_per_s: float = DEFAULT_DISK_BYTES_PER_S,
             readahead_bytes: int = DEFAULT_READAHEAD_BYTES) -> Estimate:
    """Estimate a merge's RAM, VRAM and time from its inputs' headers (nothing is read).

    Example:
        >>> estimate(recipe, sources, disk_bytes_per_s=2e9).seconds
        3.2
    """
    return estimate_plan(plan_merge(recipe, sources), sources, device=device,
                         disk_bytes_per_s=disk_bytes_per_s, readahead_bytes=readahead_bytes)


def estimate_plan(plan: MergePlan, sources: Sources, *, device: Optional[str] = None,
                  disk_bytes_per_s: float = DEFAULT_DISK_BYTES_PER_S,
                  readahead_bytes: int = DEFAULT_READAHEAD_BYTES) -> Estimate:
    """As :func:`estimate`, for a plan already made."""
    read = sum(step_read_bytes(plan, step, sources) for step in plan.steps) + prepass_bytes(plan, sources)
    write = sum(_spec_bytes(step) for step in plan.steps)
    largest = max((working_set(plan, step, sources) for step in plan.steps), default=0)
    queued = WRITE_QUEUE_DEPTH * max((_spec_bytes(step) for step in plan.steps), default=0)
    on_gpu = resolve_device(device).type == "cuda"
    vram = max((_fp32_bytes(plan, step, sources, on_gpu=True) for step in plan.steps), default=0) if on_gpu else 0
    return Estimate(read, write, min(readahead_bytes, read) + largest + queued, vram,
                    (read + write) / disk_bytes_per_s, disk_bytes_per_s)


def step_read_bytes(plan: MergePlan, step: KeyStep, sources: Sources) -> int:
    """Bytes read from disk for one output key, chained inputs followed to their files."""
    return sum(_key_read_bytes(model, key) for model, key in step_inputs(step, sources, plan.input_count))


def _key_read_bytes(model: Checkpoint, key: str) -> int:
    if isinstance(model, RecipeCheckpoint):
        return step_read_bytes(model.plan, model.step(key), model.sources)
    return _nbytes(model.shape(key), model.dtype(key))


def prepass_bytes(plan: MergePlan, sources: Sources) -> int:
    """What a statistics pass (cosineA/B) reads first: A and B over its keys, chains included."""
    own = sum(_key_read_bytes(model, key) for key in plan.prepass_keys for model in (sources.a, sources.b))
    inner = sum(prepass_bytes(m.plan, m.sources) for m in sources.models if isinstance(m, RecipeCheckpoint))
    return own + inner


def working_set(plan: MergePlan, step: KeyStep, sources: Sources) -> int:
    """RAM one key needs while it is merged: inputs, compute copies, result; chained keys add theirs."""
    reads = step_inputs(step, sources, plan.input_count)
    inputs = sum(_nbytes(model.shape(key), model.dtype(key)) for model, key in reads)
    widened = plan.method.precision == "fp32" or any(model.dtype(key) in FP8_DTYPES for model, key in reads)
    compute = _fp32_bytes(plan, step, sources) if step.action == "merge" and widened else 0
    chained = max((working_set(m.plan, m.step(key), m.sources)
                   for m, key in reads if isinstance(m, RecipeCheckpoint)), default=0)
    return inputs + compute + _spec_bytes(step) + chained


def _fp32_bytes(plan: MergePlan, step: KeyStep, sources: Sources, *, on_gpu: bool = False) -> int:
    """The key's inputs and result as fp32 (the compute copies; on a GPU, what it holds). On the CPU an
    elementwise method widens a stretch at a time (engine.STRETCH), two stretches' buffers in use."""
    count = len(step_inputs(step, sources, plan.input_count)) + 1
    numel = _numel(step.spec.shape)
    if plan.method.elementwise and not on_gpu:
        numel = min(numel, 2 * STRETCH)
    return count * numel * FP32_BYTES


def _spec_bytes(step: KeyStep) -> int:
    return _nbytes(step.spec.shape, step.spec.dtype)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()


def _numel(shape) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
