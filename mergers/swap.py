"""Hot swap: copy a merge into the loaded model in place, and put the original back.

Rebuilding the loaded model from a state dict takes A1111 12–25 s; copying the
1,143 SD1.5 tensors into its live parameters takes 0.6–3.4 s (a1111-notes.md).
So a merge streams ``(key, tensor)`` pairs straight into the live tensors, and a
restore reads the changed keys back from the model's own checkpoint file, one
tensor at a time. No copy of the model is ever held: only the originals that the
file cannot give back (keys it lacks) are kept in RAM, up to ``backup_limit``.

Example:
    >>> swapper = Swapper(host.live_model())
    >>> report = swapper.apply(merge_stream(recipe))
    >>> swapper.restore()
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergers.checkpoint import open_checkpoint
from mergers.engine import CancelToken, is_finite
from mergers.errors import MergeCancelled, MergeError, NonFiniteError
from mergers.host import LiveModel

# The largest SD tensors (CLIP token embeddings) are 76 MB (SD1, fp16) to 126 MB (SDXL's
# second encoder); a couple of them may be missing from a source file, a model's worth may not.
DEFAULT_BACKUP_LIMIT = 256 * 1024 * 1024

# A1111's hijack wraps modules in objects that keep the original as ``.wrapped``.
WRAPPED_SEGMENT = "wrapped"


@dataclass(frozen=True)
class SwapReport:
    """What one ``Swapper.apply`` did."""

    changed: int  # live tensors overwritten in this apply
    missing: tuple[str, ...]  # stream keys the live model does not have (skipped; e.g. EMA keys)
    seconds: float
    reverted: int = 0  # keys an earlier merge had changed that this one does not write, put back


def strip_wrapped(name: str) -> str:
    """A live parameter name → its checkpoint key: drop the ``wrapped`` segments A1111's hijack adds.

    Example:
        >>> strip_wrapped("cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight")
        'cond_stage_model.transformer.text_model.embeddings.token_embedding.weight'
    """
    return ".".join(part for part in name.split(".") if part != WRAPPED_SEGMENT)


def live_tensors(module: torch.nn.Module, *,
                 rename: Callable[[str], str] = strip_wrapped) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by checkpoint key (the tensors themselves, not copies).

    Example:
        >>> tensors = live_tensors(shared.sd_model)
        >>> tensors["model.diffusion_model.out.2.weight"].copy_(merged)
    """
    tensors: dict[str, torch.Tensor] = {}
    named = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in named:
        tensors.setdefault(rename(name), tensor)  # two names for one key: the first wins
    return tensors


class Swapper:
    """Swaps merges into one LiveModel (mergers.host.LiveModel) and restores it.

    Example:
        >>> swapper = Swapper(live)
        >>> swapper.apply(merge_stream(recipe), cancel=stop_event).changed
        1130
    """

    def __init__(self, live: LiveModel, *, backup_limit: int = DEFAULT_BACKUP_LIMIT):
        self.live = live
        self.backup_limit = backup_limit
        self._changed: set[str] = set()  # keys whose live tensor differs from the original
        self._backups: dict[str, torch.Tensor] = {}  # CPU originals of changed keys the source file lacks
        self._stamp: _FileStamp | None = None  # the source file as it was when the first key changed
        self._applying: _Applying | None = None  # set while apply() runs: what target_for needs

    @property
    def merged(self) -> bool:
        """True while the live weights differ from the source."""
        return bool(self._changed)

    @property
    def changed_keys(self) -> frozenset[str]:
        """The checkpoint keys whose live tensors differ from the original."""
        return frozenset(self._changed)

    @property
    def backup_bytes(self) -> int:
        """RAM held for originals the source file cannot give back (0 when it has every key)."""
        return sum(tensor.nbytes for tensor in self._backups.values())

    def apply(self, stream: Iterable[tuple[str, torch.Tensor]], *,
              cancel: CancelToken | None = None, keep_unwritten: bool = False,
              check_finite: bool = False) -> SwapReport:
        """Copy every streamed tensor into the live model; on any failure put the original back.

        ``check_finite``: refuse (``NonFiniteError``, everything put back) a floating tensor holding NaN
        or Inf before it is written — for streams the engine has not checked (``run_plan`` checks its own).

        Keys an earlier merge changed and this stream does not write are put back to the
        source, unless ``keep_unwritten``: then the stream is a partial update of the
        earlier merge (only the keys whose ratio changed) and the others stay as they are.

        Example:
            >>> report = Swapper(live).apply(merge_stream(recipe))
            >>> report.changed, report.missing
        """
        started = time.perf_counter()
        calls = _HostCalls(self.live)
        iterator = iter(stream)
        try:
            try:
                tensors = self.live.tensors()
                self._applying = _Applying(tensors, self._source_shapes(), calls)
                written, missing = self._write_all(iterator, tensors, calls, cancel, check_finite)
            finally:
                self._applying = None
                _close(iterator)  # a stopped merge stream closes its files and reader thread now
            stale = set() if keep_unwritten else self._changed - written
            reverted = self._revert_stale(stale, tensors, calls)
            _synchronize(tensors.values())
        except BaseException as error:
            self._recover(calls, error)
            raise
        calls.end(merged=self.merged)
        return SwapReport(len(written), tuple(missing), time.perf_counter() - started, reverted)

    def restore(self) -> int:
        """Put the original weights back (re-read from the source file, or from RAM); returns keys restored.

        Example:
            >>> swapper.restore()
            1130
        """
        if not self._changed:
            return 0
        calls = _HostCalls(self.live)
        calls.begin()
        try:
            return self._put_back(set(self._changed), self.live.tensors())
        finally:
            calls.end(merged=self.merged)

    def target_for(self, key: str) -> torch.Tensor | None:
        """The live tensor of ``key``, ready to be written directly (the engine's ``out_for``), or None.

        Only while ``apply`` consumes the stream: the original is accounted for first (the file
        gives it back, or a RAM copy is taken), so a merge that fails half way is still put back.

        Example:
            >>> swapper.apply(run_plan(plan, sources, out_for=swapper.target_for))
        """
        state = self._applying
        target = state.tensors.get(key) if state is not None else None
        if target is None or target.is_inference():
            return None
        state.calls.begin()
        self._remember(key, target, state.sources)
        return target.detach()  # a view without autograd: out= may write it

    # apply -----------------------------------------------------------------

    def _write_all(self, pairs: Iterator[tuple[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor],
                   calls: _HostCalls, cancel: CancelToken | None,
                   check_finite: bool = False) -> tuple[set[str], list[str]]:
        sources = self._applying.sources
        written: set[str] = set()
        missing: list[str] = []
        for key, tensor in pairs:
            if cancel is not None and cancel.is_set():
                raise MergeCancelled("merge cancelled; the loaded model's original weights were put back")
            target = tensors.get(key)
            if target is None:
                missing.append(key)
                continue
            _check_shape(key, target, tensor)
            if check_finite and not is_finite(tensor):
                raise NonFiniteError(f"{key!r}: the tensor to swap in holds NaN/Inf", key=key)
            calls.begin()  # before the backup below: it must see the weights without the host's patches
            self._remember(key, target, sources)
            _copy(target, tensor)
            self._wrote(key, tensor)
            written.add(key)
        return written, missing

    def _revert_stale(self, keys: set[str], tensors: Mapping[str, torch.Tensor], calls: _HostCalls) -> int:
        """Keys an earlier merge changed and this one does not write go back to the source: the live
        model is then its source plus this merge, never a mix of two merges."""
        if keys:
            calls.begin()
        return self._put_back(keys, tensors)

    def _source_shapes(self) -> dict[str, tuple[int, ...]]:
        """The source file's keys and shapes (its header only), and its stamp when the model is clean."""
        source = self.live.source
        if source is None:
            return {}
        with open_checkpoint(source) as ckpt:
            shapes = ckpt.shapes
        if not self._changed:
            self._stamp = _FileStamp.of(Path(source))
        return shapes

    def _remember(self, key: str, target: torch.Tensor, sources: Mapping[str, tuple[int, ...]]) -> None:
        """Before a key's first change: nothing to keep if the file gives it back, else a CPU copy."""
        if key in self._changed:
            return
        if sources.get(key) != tuple(target.shape):
            self._check_budget(key, target)
            self._backups[key] = target.detach().to("cpu", copy=True)
        self._changed.add(key)  # before the write: a write that fails half way is still put back

    def _check_budget(self, key: str, target: torch.Tensor) -> None:
        if self.backup_bytes + target.nbytes <= self.backup_limit:
            return
        source = self.live.source
        why = f"its original is not in the loaded model's file {source}" if source else \
            "the loaded model has no source file to restore it from"
        raise MergeError(
            f"{key}: {why}, and keeping the original in RAM would take the backups past "
            f"{self.backup_limit // 2**20} MiB (a swap keeps a few tensors, never a model). "
            "Save the merge to a file and load that instead"
        )

    def _recover(self, calls: _HostCalls, error: BaseException) -> None:
        """After a failed apply: back to the original weights, or a clear error if even that fails."""
        try:
            if self._changed:
                calls.begin()
                self._put_back(set(self._changed), self.live.tensors())
        except MergeError as failure:
            raise MergeError(
                f"{error}; then restoring the loaded model failed too: {failure}. Reload the checkpoint"
            ) from error
        finally:
            calls.end(merged=self.merged)

    # restore ---------------------------------------------------------------

    def _put_back(self, keys: Collection[str], tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy the originals of ``keys`` back: from RAM if saved there, else from the source file.

        Keys the live model does not show now are skipped, not restored over what the host put there
        (A1111: a VAE the user picked since); they stay marked as changed, since the host may bring the
        merged values back later (A1111 keeps the VAE it replaced and restores it when the pick is undone).
        """
        keys = [key for key in keys if key in tensors]
        if not keys:
            return 0
        from_file = [key for key in keys if key not in self._backups]
        count = self._read_back(from_file, tensors) if from_file else 0
        for key in [key for key in keys if key in self._backups]:
            _copy(_target(tensors, key), self._backups[key])
            self._wrote(key, self._backups[key])  # the live value: the file has no other
            del self._backups[key]
            self._changed.discard(key)
            count += 1
        _synchronize(tensors.values())
        return count

    def _read_back(self, keys: Collection[str], tensors: Mapping[str, torch.Tensor]) -> int:
        """Re-read ``keys`` from the source file in file order (sequential reads), one tensor at a time."""
        path = self._checked_source(keys)
        wanted = set(keys)
        count = 0
        with open_checkpoint(path) as ckpt:
            lost = sorted(wanted.difference(ckpt))
            if lost:
                raise MergeError(f"{path}: cannot restore {len(lost)} keys it no longer has, e.g. {lost[0]}")
            for key in ckpt:
                if key in wanted:
                    # copy_ rounds to the live dtype exactly as A1111's load (fp32 file, then .half()) did
                    value = ckpt[key]
                    _copy(_target(tensors, key), value)
                    self._wrote(key, value)
                    self._changed.discard(key)
                    count += 1
        return count

    def _wrote(self, key: str, value: torch.Tensor) -> None:
        """Hand the value just copied into ``key`` to the host, at full precision (optional ``LiveModel.wrote``):
        a host that keeps its own copies of weights (A1111's fp16 copies of fp8 ones) fills them from it."""
        wrote = getattr(self.live, "wrote", None)
        if wrote is not None:
            wrote(key, value)

    def _checked_source(self, keys: Collection[str]) -> Path:
        source = self.live.source
        if source is None:
            raise MergeError(
                f"cannot restore {len(keys)} keys of the loaded model: it has no source file to re-read "
                "them from. Reload the checkpoint"
            )
        if self._stamp is not None and _FileStamp.of(Path(source)) != self._stamp:
            raise MergeError(
                f"{source}: the loaded model's file changed on disk (or the model was replaced) since the "
                "merge, so its original weights cannot be read back. Reload the checkpoint"
            )
        return Path(source)


@dataclass(frozen=True)
class _Applying:
    """What one running ``apply`` knows: the live tensors, the source file's shapes, the host calls."""

    tensors: Mapping[str, torch.Tensor]
    sources: Mapping[str, tuple[int, ...]]
    calls: _HostCalls


@dataclass(frozen=True)
class _FileStamp:
    """Which file, and which version of it: restore refuses to read back from a file rewritten since."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileStamp:
        try:
            stat = path.stat()
        except OSError as error:
            raise MergeError(f"{path}: the loaded model's source file cannot be read: {error}") from None
        return cls(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


class _HostCalls:
    """``before_change`` once, before the first write; ``after_change`` only if ``before_change`` ran."""

    def __init__(self, live: LiveModel):
        self.live = live
        self.begun = False

    def begin(self) -> None:
        if not self.begun:
            self.live.before_change()
            self.begun = True

    def end(self, *, merged: bool) -> None:
        if self.begun:
            self.begun = False
            self.live.after_change(merged=merged)


def _check_shape(key: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise MergeError(
            f"{key}: the merge has shape {list(tensor.shape)}, the loaded model {list(target.shape)}; "
            "is the loaded model of another architecture than model A?"
        )


def _target(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise MergeError(f"{key}: no longer in the loaded model; reload the checkpoint") from None


def _copy(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """In place, so the model's parameter objects (and whatever holds them) stay the same."""
    # A tensor made under inference_mode (as some hosts load buffers) accepts writes only there.
    if _same_memory(target, tensor):
        return  # the merge was computed straight into the live tensor (Swapper.target_for)
    with torch.inference_mode() if target.is_inference() else torch.no_grad():
        # Pageable CPU memory is staged before copy_ returns, so the source may be freed at once;
        # the device work is waited for once, in _synchronize, not once per key.
        target.copy_(tensor, non_blocking=target.is_cuda)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride())


def _synchronize(tensors: Iterable[torch.Tensor]) -> None:
    for device in {tensor.device for tensor in tensors if tensor.is_cuda}:
        torch.cuda.synchronize(device)


def _close(iterator: Iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
