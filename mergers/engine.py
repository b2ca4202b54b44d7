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

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Optional, Protocol

import torch

from mergers.checkpoint import BufferPool, Checkpoint
from mergers.errors import MergeCancelled, MergeError, NonFiniteError
from mergers.plan import KeyStep, MergePlan, Sources

log = logging.getLogger(__name__)

# Reading ahead pays off for the next tensor or two; more only costs memory.
DEFAULT_READAHEAD_BYTES = 128 * 1024 * 1024

ProgressCallback = Callable[[int, int, str], None]
OutFor = Callable[[str], Optional[torch.Tensor]]  # key → the tensor its result ends up in, or None


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
    if wanted.startswith("mps") and not _mps_available():
        log.warning("MPS was asked for but is not available; merging on the CPU")
        return torch.device("cpu")
    try:
        return torch.device(wanted)
    except RuntimeError:
        raise MergeError(f"unknown device {name!r}; use cpu, cuda, mps or auto") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def run_plan(plan: MergePlan, sources: Sources, *, device: Optional[str] = None,
             output_device: str = "cpu", on_progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None,
             readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
             warnings: Optional[list[str]] = None,
             out_for: Optional[OutFor] = None, mapped: bool = False,
             allow_non_finite: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every planned output key, in plan order.

    ``out_for(key)`` may name the tensor a merged key is finally copied into (a loaded
    model's parameter): where its dtype, shape and device fit, the method writes its
    result straight there and that tensor is yielded, saving a full copy of the model.

    ``mapped``: safetensors inputs are mapped (``SafetensorsCheckpoint.map``), not read into
    buffers: the arithmetic reads the page cache directly, with no copy (an SD1.5 swap on 2 cores:
    1.2–1.4 s → 0.8–1.0 s, bench/swap.py). A merge to a file keeps the reads: mapping made no
    measurable difference there, where the write sets the pace.

    A merged key holding NaN or Inf stops the merge before that key is yielded: it raises
    ``NonFiniteError`` naming the key, the method and the input or formula that made it (a key
    computed straight into ``out_for``'s tensor is already there: the caller puts it back, as
    ``Swapper.apply`` does for any failure). ``allow_non_finite``: log it, append it to ``warnings``
    and go on, as the original does.

    Methods with a prepass (cosineA/B) first stream A and B once for their
    statistics; progress counts both passes.

    Example:
        >>> for key, tensor in run_plan(plan, sources):
        ...     writer.write(key, tensor)
    """
    compute = resolve_device(device)
    progress = _Progress(len(plan.prepass_keys) + len(plan.steps), on_progress, cancel)
    stats = run_prepass(plan, sources, compute, progress, readahead_bytes) if plan.method.prepass else {}
    reads = lambda step: step_inputs(step, sources, plan.input_count)  # noqa: E731
    # The thread count is set once for the whole loop: switching it per step cost more than it saved.
    threads = _merge_threads(plan, compute, chained=any(getattr(m, "plan", None) for m in sources.models),
                             pipeline=0 if mapped else PIPELINE_THREADS)
    with _Prefetcher(plan.steps, reads, readahead_bytes, mapped=mapped) as inputs, _intraop_threads(threads):
        for step, tensors in inputs:
            progress.check(step.key)
            finals: list = []  # what out_for gave for this key, if it was asked
            target = None if out_for is None or step.action != "merge" else (
                lambda k=step.key: finals.append(out_for(k)) or finals[-1])
            result = compute_step(plan, step, tensors, compute, stats, target=target)
            if step.action == "merge" and not is_finite(result):
                _non_finite(plan, step, tensors, result, warnings, allow=allow_non_finite)
            in_place = bool(finals) and finals[-1] is not None and result.data_ptr() == finals[-1].data_ptr()
            yield step.key, result if in_place else result.to(output_device)
            progress.advance(step.key)
            del tensors, result, finals, target  # the reader drops the inputs (see _Prefetcher.__iter__)


def run_prepass(plan: MergePlan, sources: Sources, device: torch.device, progress: "_Progress",
                readahead_bytes: int = DEFAULT_READAHEAD_BYTES) -> dict:
    """Stream A and B over the prepass keys and reduce them to the method's statistics."""
    prepass = plan.method.prepass
    collected = []
    reads = lambda key: [(sources.a, key), (sources.b, key)]  # noqa: E731
    with _Prefetcher(plan.prepass_keys, reads, readahead_bytes) as inputs:
        for key, (a, b) in inputs:
            progress.check(key)
            collected.append(prepass.collect(a.to(device), b.to(device)))
            progress.advance(key)
    return prepass.reduce(collected)


class _Progress:
    """Counts done keys for the callback and raises when the cancel token is set."""

    def __init__(self, total: int, callback: Optional[ProgressCallback], cancel: Optional[CancelToken]):
        self.total, self.done, self._callback, self._cancel = total, 0, callback, cancel

    def check(self, key: str) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise MergeCancelled(f"merge cancelled at key {self.done + 1} of {self.total} ({key})")

    def advance(self, key: str) -> None:
        self.done += 1
        if self._callback is not None:
            self._callback(self.done, self.total, key)


def is_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf; one reduction, no full-size temporary (a fp32 sum made one)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype in FP8_FIRST_NON_FINITE and tensor.device.type == "cpu":  # by code: 13× the fp16 route
        codes = tensor.reshape(-1).view(torch.uint8) & 0x7F
        return int(codes.max()) < FP8_FIRST_NON_FINITE[tensor.dtype]
    try:
        low, high = torch.aminmax(tensor.reshape(-1))  # NaN and ±Inf reach the min or max; no temporary
    except RuntimeError:  # fp8 has neither aminmax nor isfinite; fp16 holds all its values, NaN included
        return bool(torch.isfinite(tensor.to(torch.float16)).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _non_finite(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor], result: torch.Tensor,
                warnings: Optional[list], *, allow: bool) -> None:
    """Refuse a non-finite result (NonFiniteError), or with ``allow`` log it and add it to ``warnings``."""
    message = non_finite_message(plan, step.key, tensors, result)
    if not allow:
        raise NonFiniteError(message, key=step.key, method=plan.method.label)
    log.warning(message)
    if warnings is not None:
        warnings.append(message)


ROLES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # model A, B, C, then more_models D, E, …


def non_finite_message(plan: MergePlan, key: str, tensors: list[torch.Tensor], result: torch.Tensor) -> str:
    """What a non-finite merged key says: the key, what it holds, the method, and where it came from
    (an input that holds NaN/Inf there, the output dtype's range, or the method's formula)."""
    culprits = [role for role, tensor in zip(ROLES, tensors) if not is_finite(tensor)]
    wide = result.float() if result.dtype in FP8_DTYPES else result
    kinds = " and ".join(kind for kind, found in (("NaN", torch.isnan(wide).any()), ("Inf", torch.isinf(wide).any()))
                         if found) or "NaN/Inf"
    method = plan.method
    if culprits:
        source = f"model {'/'.join(culprits)} holds NaN/Inf there"
    elif kinds == "Inf" and result.dtype in NARROW_DTYPES:
        source = f"the result passes the range of {str(result.dtype).replace('torch.', '')} (inputs are finite)"
    else:
        source = f"its formula {method.formula} made it from finite inputs"
    return f"{key!r}: merged result is not finite ({kinds}; {method.label}: {source})"


NARROW_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def compute_step(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor],
                 device: torch.device, stats: Optional[dict] = None, *,
                 target: Optional[Callable[[], Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """The output tensor of one step, in its planned dtype (written into ``target()`` where it fits)."""
    if step.action == "clip_ids":
        return torch.arange(step.spec.shape[-1], dtype=torch.int64).reshape(step.spec.shape)
    if step.action != "merge":
        return tensors[0].to(step.spec.dtype)
    try:
        merged = _merge_tensors(plan, step, tensors, device, stats or {}, target)
        return _narrow(merged, step.spec.dtype, getattr(tensors, "pool", None))
    except (RuntimeError, ValueError) as error:  # name the key, not a frame deep inside torch
        raise MergeError(f"merging {step.key!r} failed: {error}") from error


# The reader and writer threads each keep a core busy copying to and from the page cache.
PIPELINE_THREADS = 2


def _merge_threads(plan: MergePlan, device: torch.device, *, chained: bool = False,
                   pipeline: int = PIPELINE_THREADS) -> int:
    """torch's threads for one CPU merge step: the cores the pipeline's reader and writer leave.

    Elementwise merges are memory-bound; on 2 cores, torch's second thread spinning
    for work starved the reader and writer (a 1/8-scale SD1 merge: 8.3 s with 2, 1.4 s with 1).
    Only "native" methods (elementwise, so the same bits on any thread count) are limited:
    a reduction's sum order, hence its last bits, depends on the thread count.
    """
    threads = torch.get_num_threads()
    # A chained input merges its inner recipe on the reader thread, with whatever method it has;
    # torch's thread count is global, so it is left alone there.
    if device.type != "cpu" or plan.method.precision != "native" or chained:
        return threads
    # Mapped reads (an in-place swap: nothing to write either) leave the pipeline threads idle: all cores.
    return max(1, min(threads, (os.cpu_count() or 1) - pipeline))


@contextlib.contextmanager
def _intraop_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then put the caller's setting back."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _merge_tensors(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor],
                   device: torch.device, stats: dict,
                   target: Optional[Callable[[], Optional[torch.Tensor]]] = None) -> torch.Tensor:
    dtype = _compute_dtype(plan.method.precision, tensors)
    pool = getattr(tensors, "pool", None)
    params = {"alpha": step.alpha, "beta": step.beta, "gamma": plan.recipe.gamma, "seed": plan.recipe.seed,
              "key": step.key, **stats}
    if _in_stretches(plan, step, tensors, dtype, device, pool):
        return _merge_in_stretches(plan, step, tensors, dtype, pool, params)
    if pool is not None and dtype != tensors[0].dtype:  # widened inputs and result live in the pool too
        pool.keep_at_least(_working_set(tensors, dtype))
    inputs = [_widen(t, dtype, device, pool) for t in tensors]
    if step.channels is not None:  # inpainting A: merge the channels the models share
        inputs = [t[:, : step.channels] for t in inputs]
    params["out"] = _result_buffer(plan, step, inputs, tensors, target)
    merged = plan.method.func(*inputs, **{name: params[name] for name in plan.method.params})
    if step.adjust is not None:
        merged = step.adjust(merged)
    if step.channels is None:
        return merged
    full = tensors[0].to(device=device, dtype=merged.dtype, copy=True)
    full[:, : step.channels] = merged
    return full


# Widened (fp8 → fp32) elementwise merges go a stretch at a time: a Flux key of 66 M fp8 values would
# otherwise take 1 GB of fp32 copies; 4 M values (16 MB each) keep the work in a few small buffers.
STRETCH = 4 * 1024 * 1024


def _in_stretches(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor], dtype: torch.dtype,
                  device: torch.device, pool: Optional[BufferPool]) -> bool:
    return (plan.method.elementwise and pool is not None and device.type == "cpu" and step.channels is None
            and step.adjust is None and any(t.dtype != dtype for t in tensors)
            and all(t.shape == tensors[0].shape and t.is_contiguous() for t in tensors)
            and tensors[0].numel() > STRETCH)


def _merge_in_stretches(plan: MergePlan, step: KeyStep, tensors: list[torch.Tensor], dtype: torch.dtype,
                        pool: BufferPool, params: dict) -> torch.Tensor:
    """An elementwise merge of widened inputs, ``STRETCH`` values at a time, straight into the planned
    dtype: the same bits as widening whole tensors, in a few stretch-sized buffers."""
    result = pool.tensor(step.spec.dtype, tuple(tensors[0].shape))
    flat_result, flats = result.reshape(-1), [t.reshape(-1) for t in tensors]
    cpu = torch.device("cpu")
    for start in range(0, flat_result.numel(), STRETCH):
        end = min(start + STRETCH, flat_result.numel())
        inputs = [_widen(flat[start:end], dtype, cpu, pool) for flat in flats]
        params["out"] = pool.tensor(dtype, (end - start,)) if "out" in plan.method.params else None
        merged = plan.method.func(*inputs, **{name: params[name] for name in plan.method.params})
        flat_result[start:end].copy_(merged)
        del inputs, merged  # their buffers serve the next stretch
    return result


def _result_buffer(plan: MergePlan, step: KeyStep, inputs: list[torch.Tensor], tensors: list[torch.Tensor],
                   target: Optional[Callable[[], Optional[torch.Tensor]]] = None) -> Optional[torch.Tensor]:
    """Where a method that computes ``out=`` writes (None where it would not be used): the final
    target if it fits, else a reused buffer — a fresh result is a fresh mmap whose pages all fault,
    ~1/3 of a merge's system time."""
    pool = getattr(tensors, "pool", None)  # set by _Prefetcher on the inputs it read
    if "out" not in plan.method.params or step.channels is not None:
        return None
    first = inputs[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device for t in inputs):
        return None
    if target is not None and first.dtype == step.spec.dtype and step.adjust is None:
        final = target()
        if final is not None and _fits(final, first):
            return final  # on a GPU too: a live CUDA parameter takes the result with no round trip
    if pool is None or first.device.type != "cpu":
        return None
    return pool.tensor(first.dtype, tuple(first.shape))


def _fits(final: torch.Tensor, like: torch.Tensor) -> bool:
    """``final`` can take a result shaped like ``like`` as an ``out=`` (contiguous, same kind, no autograd)."""
    return (final.device == like.device and final.dtype == like.dtype and final.shape == like.shape
            and final.is_contiguous() and not final.requires_grad and not final.is_inference())


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# fp8 → fp32 by table: torch's element-wise conversion ran at 0.28 G/s on one core, a 256-entry lookup at
# 1.2 G/s, with the same bits (every fp8 value, NaN included, is exact in fp32).
FP8_TABLES = {dtype: torch.arange(256, dtype=torch.uint8).view(dtype).float() for dtype in FP8_DTYPES}
# fp8's non-finite codes, sign bit cleared: e4m3fn has NaN only (0x7F); e5m2 has Inf (0x7C) and NaN above it.
# Dtypes a device cannot hold: Apple's MPS has no fp64 and no fp8, so those are widened (or
# narrowed) on the CPU side of the transfer.
DEVICE_LACKS = {"mps": frozenset({torch.float64, torch.float8_e4m3fn, torch.float8_e5m2})}
FP8_FIRST_NON_FINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _widen(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device,
           pool: Optional[BufferPool]) -> torch.Tensor:
    """``tensor`` as ``dtype`` on ``device`` for the arithmetic; fp8 on the CPU through the table,
    into a pooled buffer (no fresh pages per key)."""
    if tensor.dtype in FP8_TABLES and dtype == torch.float32 and device.type == "cpu" and pool is not None:
        codes = pool.tensor(torch.int32, tuple(tensor.shape))
        codes.copy_(tensor.view(torch.uint8))
        out = pool.tensor(torch.float32, tuple(tensor.shape))
        torch.index_select(FP8_TABLES[tensor.dtype], 0, codes.reshape(-1), out=out.reshape(-1))
        return out
    if tensor.dtype in DEVICE_LACKS.get(device.type, ()):  # widen where the dtype exists, then move
        tensor = tensor.to(dtype)
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


def _narrow(merged: torch.Tensor, dtype: torch.dtype, pool: Optional[BufferPool]) -> torch.Tensor:
    """The result in its planned dtype; a narrowing on the CPU goes into a pooled buffer."""
    if dtype in DEVICE_LACKS.get(merged.device.type, ()):
        return merged.to("cpu").to(dtype)
    if merged.dtype == dtype or pool is None or merged.device.type != "cpu":
        return merged.to(dtype)
    return pool.tensor(dtype, tuple(merged.shape)).copy_(merged)


def _working_set(tensors: list[torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes one widened step holds: each input and the result in ``dtype``, and the table's indices."""
    numel = max(t.numel() for t in tensors)
    return numel * (torch.empty((), dtype=dtype).element_size() * (len(tensors) + 1) + 4)


def _compute_dtype(precision: str, tensors: list[torch.Tensor]) -> torch.dtype:
    if precision == "fp32" or any(t.dtype in FP8_DTYPES for t in tensors):
        return torch.float32  # torch has no fp8 arithmetic: compute in fp32, written back as planned
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def step_inputs(step: KeyStep, sources: Sources, model_count: int) -> list:
    """The checkpoints (and the key in each) that a step reads."""
    if step.action == "merge":
        return [(model, step.key) for model in sources.models[:model_count]]
    if step.action == "copy_a":
        return [(sources.a, step.key)]
    if step.action == "copy_b":
        return [(sources.b, step.key)]
    if step.action == "vae":
        return [(sources.vae, step.key.split(".", 1)[1])]
    return []


class PooledInputs(list):
    """One step's input tensors, with the pool they were read into (results may use it too)."""

    def __init__(self, tensors, pool: BufferPool):
        super().__init__(tensors)
        self.pool = pool


class _Prefetcher:
    """Reads each item's input tensors on a background thread, a bounded number of bytes ahead.

    Checkpoints are read into a ``BufferPool`` (sized by the budget), so a merge
    reuses the same few buffers instead of faulting in fresh memory per tensor.
    """

    _DONE = object()

    def __init__(self, items, reads: Callable[[object], list], budget: int, *, mapped: bool = False):
        # Idle buffers up to the whole budget stay for reuse: keeping half made the reader drop and
        # re-fault buffers, and an SD1.5 swap waited on it (3.0 s → 1.7 s).
        self.pool = BufferPool(keep_bytes=budget)
        self._items = items
        self._reads = reads
        self._mapped = mapped  # map safetensors tensors instead of reading them (see run_plan)
        self._retired: list = []  # mapped inputs the consumer is done with, for the reader to drop
        self._budget = budget
        self._in_flight = 0
        self._lock = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supermerger-reader", daemon=True)

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
            entry, tensors, size = item
            yield entry, tensors
            if self._mapped:  # unmapping 4 GB of populated pages took the main thread 0.3 s: the reader does it
                with self._lock:
                    self._retired.append(tensors)
            del item, entry, tensors
            self._release(size)

    def _run(self) -> None:
        try:
            for item in self._items:
                self._drop_retired()
                tensors = PooledInputs((self._read(model, key) for model, key in self._reads(item)), self.pool)
                size = sum(t.numel() * t.element_size() for t in tensors)
                if not self._reserve(size):
                    return
                self._queue.put((item, tensors, size))
            self._queue.put(self._DONE)
        except BaseException as error:  # handed to the consumer, which raises it
            self._queue.put(error)

    def _drop_retired(self) -> None:
        """Let go of the inputs the consumer is done with, here on the reader thread."""
        with self._lock:
            retired, self._retired = self._retired, []
        del retired

    def _read(self, model, key: str) -> torch.Tensor:
        if self._mapped and hasattr(model, "map"):
            return model.map(key)
        return model.read(key, pool=self.pool) if isinstance(model, Checkpoint) else model[key]

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
        # An abandoned merge stream may be finalised by the garbage collector on any thread, its own
        # reader's included; that thread ends by itself once stopped.
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
