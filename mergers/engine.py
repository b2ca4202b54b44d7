"""The streaming executor: runs a plan key by key.

A reader thread fetches the next keys' input tensors while the caller's thread
computes the current one and hands it on (to a file writer, or into a loaded
model). What is in flight is bounded in bytes, so a merge holds a few tensors,
never a model. torch and file reads release the GIL, so the two threads
overlap for real.

Dtype and device live here, not in the methods: inputs are moved to the
device and brought to the method's precision, the result is cast to the
planned output dtype.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Optional, Protocol

import torch

from mergers.errors import MergeCancelled, MergeError
from mergers.plan import KeyStep, MergePlan, Sources

log = logging.getLogger(__name__)

# Reading ahead pays off for the next tensor or two; more only costs memory.
DEFAULT_READAHEAD_BYTES = 512 * 1024 * 1024

ProgressCallback = Callable[[int, int, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


def resolve_device(name: Optional[str]) -> torch.device:
    """``"cuda"`` when asked for and present, else ``"cpu"``; ``"auto"``/None picks CUDA if there is one.

    Example:
        >>> resolve_device("auto")
        device(type='cpu')
    """
    wanted = (name or "auto").lower()
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA was asked for but is not available; merging on the CPU")
        return torch.device("cpu")
    try:
        return torch.device(wanted)
    except RuntimeError:
        raise MergeError(f"unknown device {name!r}; use cpu, cuda or auto") from None


def run_plan(plan: MergePlan, sources: Sources, *, device: Optional[str] = None,
             output_device: str = "cpu", on_progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None,
             readahead_bytes: int = DEFAULT_READAHEAD_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every planned output key, in plan order.

    Example:
        >>> for key, tensor in run_plan(plan, sources):
        ...     writer.write(key, tensor)
    """
    compute = resolve_device(device)
    total = len(plan.steps)
    with _Prefetcher(plan.steps, sources, readahead_bytes) as inputs:
        for done, (step, tensors) in enumerate(inputs, start=1):
            if cancel is not None and cancel.is_set():
                raise MergeCancelled(f"merge cancelled at key {done} of {total} ({step.key})")
            result = compute_step(plan, step, tensors, compute)
            yield step.key, result.to(output_device)
            if on_progress is not None:
                on_progress(done, total, step.key)


def compute_step(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """The output tensor of one step, in its planned dtype."""
    if step.action == "clip_ids":
        return torch.arange(step.spec.shape[-1], dtype=torch.int64).reshape(step.spec.shape)
    if step.action != "merge":
        return tensors[0].to(step.spec.dtype)
    try:
        return _merge_tensors(plan, step, tensors, device).to(step.spec.dtype)
    except (RuntimeError, ValueError) as error:  # name the key, not a frame deep inside torch
        raise MergeError(f"merging {step.key!r} failed: {error}") from error


def _merge_tensors(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor],
                   device: torch.device) -> torch.Tensor:
    dtype = _compute_dtype(plan.method.precision, tensors)
    inputs = [t.to(device=device, dtype=dtype, non_blocking=True) for t in tensors]
    if step.channels is not None:  # inpainting A: merge the channels the models share
        inputs = [t[:, : step.channels] for t in inputs]
    params = {"alpha": step.alpha, "beta": step.beta}
    merged = plan.method.func(*inputs, **{name: params[name] for name in plan.method.params})
    if step.channels is None:
        return merged
    full = tensors[0].to(device=device, dtype=merged.dtype, copy=True)
    full[:, : step.channels] = merged
    return full


def _compute_dtype(precision: str, tensors: list[torch.Tensor]) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def step_inputs(step: KeyStep, sources: Sources, model_count: int) -> list:
    """The checkpoints (and the key in each) that a step reads."""
    if step.action == "merge":
        models = [sources.a, sources.b, sources.c][:model_count]
        return [(model, step.key) for model in models]
    if step.action == "copy_a":
        return [(sources.a, step.key)]
    if step.action == "copy_b":
        return [(sources.b, step.key)]
    if step.action == "vae":
        return [(sources.vae, step.key.split(".", 1)[1])]
    return []


class _Prefetcher:
    """Reads each step's inputs on a background thread, a bounded number of bytes ahead."""

    _DONE = object()

    def __init__(self, steps, sources: Sources, budget: int):
        self._steps = steps
        self._sources = sources
        self._budget = budget
        self._in_flight = 0
        self._lock = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supermerger-reader", daemon=True)
        self._model_count = 3 if sources.c is not None else 2

    def __enter__(self):
        self._thread.start()
        return self

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            step, tensors, size = item
            yield step, tensors
            self._release(size)

    def _run(self) -> None:
        try:
            for step in self._steps:
                tensors = [model[key] for model, key in step_inputs(step, self._sources, self._model_count)]
                size = sum(t.numel() * t.element_size() for t in tensors)
                if not self._reserve(size):
                    return
                self._queue.put((step, tensors, size))
            self._queue.put(self._DONE)
        except BaseException as error:  # handed to the consumer, which raises it
            self._queue.put(error)

    def _reserve(self, size: int) -> bool:
        with self._lock:
            # Always admit one item, however large, so a huge tensor cannot stall the stream.
            while self._in_flight and self._in_flight + size > self._budget and not self._stop.is_set():
                self._lock.wait()
            self._in_flight += size
            return not self._stop.is_set()

    def _release(self, size: int) -> None:
        with self._lock:
            self._in_flight -= size
            self._lock.notify_all()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._thread.join(timeout=60)
