"""Reading checkpoints one tensor at a time.

``open_checkpoint(path)`` returns a read-only ``Mapping[str, Tensor]`` whose keys
come in file order. For safetensors only the header is parsed up front; each
tensor is read at its offset (``pread``; see ``mergers.fileio``) when it is asked for, so a merge holds a few
tensors, never a model. We read instead of mapping the file because mapped
pages count towards the process's RSS until unmapped.

``ckpt.read(key, pool=BufferPool(...))`` reads into a reused buffer instead of
fresh memory: a fresh large allocation is a fresh ``mmap`` whose every 4 KiB
page faults when first touched (~1.2 M faults per SD1.5 merge, most of its
system time); a pooled buffer faults once and is reused for the whole merge.

Example:
    >>> pool = BufferPool(keep_bytes=256 << 20)
    >>> with open_checkpoint("model.safetensors") as ckpt:
    ...     w = ckpt.read("model.diffusion_model.out.2.weight", pool=pool)

Pickle checkpoints (``.ckpt``/``.pt``/``.pth``) go through
``torch.load(weights_only=True)``: a pickle that needs code is refused.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import mmap
import os
import struct
import sys
import threading
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from mergers.errors import CheckpointError, UnsafeCheckpointError
from mergers.fileio import open_for_reading, pread, pread_into
from mergers.hashing import RunningHash, cached_sha256, legacy_hash, remember_sha256, sha256_of_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Real SD headers are under 1 MB; anything past this is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, and what it is."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


class Checkpoint(Mapping):
    """A checkpoint whose tensors are read on demand, in file order.

    Subclasses fill ``_infos`` (key → TensorInfo-like with dtype and shape)
    and implement ``_read``.
    """

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        self._sha256: str | None = None

    # Mapping protocol -------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._infos:
            raise KeyError(key)
        return self._read(key)

    def read(self, key: str, *, pool: "BufferPool | None" = None) -> torch.Tensor:
        """The tensor under ``key``, read into a buffer of ``pool`` when given (else fresh memory).

        Example:
            >>> w = ckpt.read("model.diffusion_model.out.2.weight", pool=BufferPool(keep_bytes=1 << 28))
        """
        if key not in self._infos:
            raise KeyError(key)
        return self._read(key, pool)

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from the file so far (0 for formats loaded whole)."""
        return 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    # Cheap facts, from the header ---------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        return self._infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._infos[key].dtype

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: info.shape for key, info in self._infos.items()}

    @property
    def name(self) -> str:
        return self.path.name

    # Hashes, A1111-compatible ---------------------------------------------
    def sha256(self) -> str:
        """The file's sha256, as A1111 shows it (computed once, cached on disk)."""
        if self._sha256 is None:
            self._sha256 = sha256_of_file(self.path)
        return self._sha256

    def hash_while_reading(self) -> bool:
        """Compute the sha256 from the reads to come, if it is not cached; True if it will."""
        return False

    def shorthash(self) -> str:
        """A1111's short hash: the first 10 hex digits of the sha256."""
        return self.sha256()[:10]

    def legacy_hash(self) -> str:
        """A1111's old 8-digit hash of 64 KiB at offset 1 MiB."""
        return legacy_hash(self.path)

    def close(self) -> None:
        """Release the file; reads after this fail."""

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file: header parsed once, tensors read by ``pread``."""

    def __init__(self, path: Path):
        self._fd = open_for_reading(path)
        try:
            size = os.fstat(self._fd).st_size
            header, data_start = _read_header(self._fd, size, path)
            metadata = header.pop("__metadata__", None) or {}
            self._infos = _tensor_infos(header, data_start, size, path)
        except BaseException:
            self.close()
            raise
        super().__init__(path, _string_metadata(metadata, path))
        self._running_hash: RunningHash | None = None
        self._bytes_read = 0

    def _read(self, key: str, pool: "BufferPool | None" = None) -> torch.Tensor:
        info = self._infos[key]
        raw = pool.take(info.nbytes) if pool is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            _pread_into(self._fd, raw.numpy(), info.start, self.path, key)
            self._bytes_read += info.nbytes
            if self._running_hash is not None:
                self._running_hash.feed(info.start, raw.numpy())
        return raw.view(info.dtype).reshape(info.shape)

    def map(self, key: str) -> torch.Tensor:
        """The tensor under ``key`` as a copy-on-write mapping of its bytes in the file: no copy out of
        the page cache. The mapping lives as long as the tensor (and its views) do, so only the tensors
        in use count towards RSS. Falls back to a read where a mapping cannot serve (a hash being
        computed from the reads, an unaligned offset).

        Example:
            >>> torch.lerp(a.map(key), b.map(key), 0.5, out=live[key])
        """
        info = self._infos[key]
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: the file is closed; cannot map {key!r}")
        element = torch.empty((), dtype=info.dtype).element_size()
        if self._running_hash is not None or info.nbytes == 0 or info.start % element:
            return self._read(key)
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, info.start + info.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{self.path}: cannot map {key!r}: {error}") from None
        _populate(mapped, self.path, key)
        self._bytes_read += info.nbytes
        raw = numpy.frombuffer(mapped, dtype=numpy.uint8, count=info.nbytes, offset=info.start - start)
        return torch.from_numpy(raw).view(info.dtype).reshape(info.shape)

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def hash_while_reading(self) -> bool:
        if self._sha256 is None:
            self._sha256 = cached_sha256(self.path)
        if self._sha256 is None and self._running_hash is None:
            self._running_hash = RunningHash(self._fd, os.fstat(self._fd).st_size)
        return self._running_hash is not None

    def sha256(self) -> str:
        if self._sha256 is None and self._running_hash is not None:
            try:
                self._sha256 = self._running_hash.hexdigest()
            except OSError as error:
                raise CheckpointError(f"{self.path}: cannot hash: {error}") from None
            remember_sha256(self.path, self._sha256)
            self._running_hash = None
        return super().sha256()

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


class PickleCheckpoint(Checkpoint):
    """A ``.ckpt``/``.pt`` file, loaded with ``weights_only=True`` (memory-mapped when the format allows)."""

    def __init__(self, path: Path):
        state = _safe_torch_load(path)
        tensors = {k: v for k, v in _unwrap_state_dict(state, path).items() if isinstance(v, torch.Tensor)}
        self._tensors = tensors
        self._infos = {k: _PickleInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        super().__init__(path, {})

    def _read(self, key: str, pool: "BufferPool | None" = None) -> torch.Tensor:
        return self._tensors[key]  # already in memory: a pool would only add a copy

    def close(self) -> None:
        self._tensors = {}


class BufferPool:
    """Reusable memory for tensors of a stream: each buffer is faulted in once, then reused.

    ``take`` lends a buffer as a tensor viewing a numpy array. It is free again as
    soon as every tensor and view made from it is gone (CPython frees them at once,
    so the storage's reference to the array is the only one to watch): nobody hands
    buffers back by hand, and a consumer that keeps a result keeps its buffer.
    Requests under ``min_bytes`` get fresh memory: malloc serves those from its
    heap without new pages. Idle buffers beyond ``keep_bytes`` are dropped.

    Example:
        >>> pool = BufferPool(keep_bytes=256 << 20)
        >>> out = pool.tensor(torch.float16, (320, 320))
        >>> torch.lerp(a, b, 0.3, out=out)
    """

    def __init__(self, *, keep_bytes: int, min_bytes: int = 256 * 1024):
        self.keep_bytes = self._base_keep = keep_bytes
        self.min_bytes = min_bytes
        self._arrays: list[numpy.ndarray] = []
        self._lock = threading.Lock()
        self.allocated_bytes = 0  # every buffer ever made
        self.peak_bytes = 0  # most bytes held at once, lent or idle
        self.reuses = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor of ``nbytes`` (contents undefined)."""
        if nbytes < self.min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            idle = _idle_arrays(self._arrays, _IDLE_REFERENCES)
            fits = [array for array in idle if array.nbytes >= nbytes]
            if fits:
                self.reuses += 1
                array = min(fits, key=lambda a: a.nbytes)
            else:
                self._drop_idle(idle, room=self.keep_bytes - _size_class(nbytes))
                array = self._allocate(_size_class(nbytes))
            return torch.from_numpy(array[:nbytes])

    def keep_at_least(self, nbytes: int) -> None:
        """Keep idle buffers up to the first ``keep_bytes`` plus ``nbytes`` (a step's working set), so a
        step that needs more than the read-ahead (fp8 widened to fp32) reuses its buffers too."""
        self.keep_bytes = max(self.keep_bytes, self._base_keep + nbytes)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of ``dtype`` and ``shape`` in a pooled buffer."""
        nbytes = _numel(tuple(shape)) * torch.empty((), dtype=dtype).element_size()
        return self.take(nbytes).view(dtype).reshape(shape)

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer the pool holds now, lent or idle."""
        return sum(array.nbytes for array in self._arrays)

    def _allocate(self, nbytes: int) -> numpy.ndarray:
        array = numpy.empty(nbytes, dtype=numpy.uint8)
        self._arrays.append(array)
        self.allocated_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return array

    def _drop_idle(self, idle: list, room: int) -> None:
        """Forget the largest idle buffers until those left fit in ``room`` bytes."""
        kept = sum(array.nbytes for array in idle)
        for array in sorted(idle, key=lambda a: a.nbytes, reverse=True):
            if kept <= max(room, 0):
                break
            kept -= array.nbytes
            self._arrays = [a for a in self._arrays if a is not array]


def _idle_arrays(arrays: list, baseline: int) -> list:
    """The arrays nothing but the pool refers to (no live tensor or view made from them)."""
    return [array for array in arrays if sys.getrefcount(array) <= baseline]


def _idle_baseline() -> int:
    """How many references an unused array has inside ``_idle_arrays`` (list, loop, call): measured,
    not assumed, as it differs between Python versions."""
    probe = [numpy.empty(1, dtype=numpy.uint8)]
    return next(n for n in range(1, 8) if _idle_arrays(probe, n))


_IDLE_REFERENCES = _idle_baseline()


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to an eighth of its power of two (≤ 12.5 % waste), so buffers fit
    the many nearby tensor sizes of a model and get reused."""
    step = max(1 << max(nbytes.bit_length() - 4, 0), 4096)
    return -(-nbytes // step) * step


@dataclass(frozen=True)
class _PickleInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint for reading, one tensor at a time.

    Example:
        >>> with open_checkpoint("model.safetensors") as ckpt:
        ...     w = ckpt["model.diffusion_model.out.2.weight"]
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsCheckpoint(path)
    if suffix in PICKLE_SUFFIXES:
        return PickleCheckpoint(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format {suffix!r}; expected .safetensors, .ckpt, .pt or .pth"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``F16`` …)."""
    return DTYPE_NAMES[dtype]


# safetensors header ---------------------------------------------------------

def _read_header(fd: int, size: int, path: Path) -> tuple[dict, int]:
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (length,) = struct.unpack("<Q", pread(fd, 8, 0))
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header of {length} bytes is too large (corrupt file?)")
    if 8 + length > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header says {length} bytes, file has {size - 8})")
    raw = pread(fd, length, 8)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: bad safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: bad safetensors header (not a JSON object)")
    return header, 8 + length


def _tensor_infos(header: dict, data_start: int, size: int, path: Path) -> dict[str, TensorInfo]:
    infos = {key: _tensor_info(key, entry, data_start, path) for key, entry in header.items()}
    ordered = dict(sorted(infos.items(), key=lambda item: item[1].start))
    end = data_start
    for key, info in ordered.items():
        if info.start < end:
            raise CheckpointError(f"{path}: tensor {key!r} overlaps the one before it (corrupt header)")
        end = info.start + info.nbytes
    if end > size:
        raise CheckpointError(f"{path}: truncated file: tensors end at byte {end}, the file has {size}")
    return ordered


def _tensor_info(key: str, entry: object, data_start: int, path: Path) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except KeyError as error:
        if isinstance(entry, dict) and "dtype" in entry and error.args[0] == entry["dtype"]:
            raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {entry['dtype']!r}") from None
        raise CheckpointError(f"{path}: tensor {key!r} has a bad header entry (missing {error})") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {key!r} has a bad header entry: {entry!r:.200}") from None
    nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {key!r} of shape {list(shape)} {entry['dtype']} needs {nbytes} bytes, "
            f"its offsets give {end - begin}"
        )
    return TensorInfo(dtype, shape, data_start + begin, nbytes)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _string_metadata(metadata: object, path: Path) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: bad safetensors metadata (must map strings to strings)")
    return dict(metadata)


CAN_ADVISE = hasattr(mmap.mmap, "madvise")  # absent on Windows
MADV_POPULATE_READ = 22  # Linux 5.14+: fault every page in now, and report a failure as an error


def _populate(mapped: mmap.mmap, path: Path, key: str) -> None:
    """Fault a fresh mapping in now (on the reader thread), so that a file cut short or a failing disk
    is a clear error here, not a SIGBUS later in the arithmetic; older kernels get a read-ahead hint."""
    if not CAN_ADVISE:  # Windows: pages fault in as the arithmetic touches them
        return
    try:
        mapped.madvise(MADV_POPULATE_READ)
    except OSError as error:
        if error.errno in (errno.EFAULT, errno.EIO, errno.ENOMEM):
            mapped.close()
            raise CheckpointError(f"{path}: cannot read {key!r} ({os.strerror(error.errno)}); "
                                  "was the file changed or cut short?") from None
        with contextlib.suppress(OSError, AttributeError):  # EINVAL: a kernel before 5.14, or macOS
            mapped.madvise(mmap.MADV_WILLNEED)


def _pread_into(fd: int, buffer, offset: int, path: Path, key: str) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = pread_into(fd, view[done:], offset + done)
        if got == 0:
            raise CheckpointError(f"{path}: truncated file while reading {key!r}")
        done += got


# pickles --------------------------------------------------------------------

class _InertObject:
    """Stands in for training-time objects that old ``.ckpt`` files carry (Lightning's
    ModelCheckpoint callback, which A1111's own loader also lets through): it runs no
    code, keeps no state, and never reaches the state dict."""

    def __setstate__(self, state) -> None:
        pass


def _inert_globals() -> list:
    """Globals of real SD ``.ckpt`` files that are data, not code, allowed on top of torch's own."""
    names = ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    allowed: list = [(_InertObject, name) for name in names]
    scalar = _numpy_scalar()
    if scalar is not None:  # old checkpoints store global_step as a numpy scalar
        allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                    numpy.dtype] + [type(numpy.dtype(code)) for code in ("f8", "i8", "f4")]
    return allowed


def _numpy_scalar():
    """numpy's pickled-scalar constructor, which numpy 2 moved from ``numpy.core`` to ``numpy._core``.

    numpy 1.26 (A1111 v1.10 pins it) also has a ``numpy._core`` once torch is imported, but an empty
    stub: ask each for ``multiarray.scalar`` rather than trusting the name.
    """
    for name in ("_core", "core"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(f"numpy.{name}.multiarray").scalar
    return None


def _safe_torch_load(path: Path) -> object:
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow(_inert_globals()) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types here; all mean "can't load safely"
        raise _pickle_error(path, error) from None


def _pickle_error(path: Path, error: Exception) -> CheckpointError:
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in type(error).__name__:
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return UnsafeCheckpointError(
            f"{path}: refused to load: this pickle needs code to run ({first[:200]}). "
            "Pickles can run anything; convert the file to .safetensors with a tool you trust."
        )
    return CheckpointError(f"{path}: cannot read checkpoint ({type(error).__name__}: {text[:200]})")


def _unwrap_state_dict(state: object, path: Path) -> dict:
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (found {type(state).__name__})")
    return state
