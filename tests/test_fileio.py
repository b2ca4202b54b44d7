"""The portable I/O layer: Windows' and macOS's fallbacks, forced on Linux, give the same bytes.

Windows' Python lacks ``pread``/``preadv``/``pwrite``, ``posix_fadvise`` and ``mmap.madvise``;
each test here takes the calls away and checks that reading, hashing, writing and mapping still
give exactly what the native calls give.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading

import pytest
import torch

import mergers.checkpoint as checkpoint_module
from mergers import fileio
from mergers.checkpoint import open_checkpoint
from mergers.fileio import pread, pread_into, pwrite, use_positional_calls
from mergers.hashing import RunningHash
from mergers.writer import SafetensorsWriter, TensorSpec, save_checkpoint


@pytest.fixture
def windows_io(monkeypatch):
    """No positional calls, no fadvise, no madvise: what Windows' Python offers."""
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    with use_positional_calls(False):
        yield


def _model(tmp_path, name="m.safetensors"):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"k{i}": torch.randn(300 + i, generator=generator).half() for i in range(20)}
    tensors["z"] = torch.full((64,), 0x1A, dtype=torch.uint8)  # a Ctrl-Z byte ends a text-mode read on Windows
    return save_checkpoint(tmp_path / name, tensors), tensors


def test_fallback_reads_equal_native_reads(tmp_path):
    path, tensors = _model(tmp_path)
    with use_positional_calls(False), open_checkpoint(path) as ckpt:
        assert not fileio.positional_calls_native()
        for key, tensor in tensors.items():
            assert torch.equal(ckpt[key], tensor), key
    with open_checkpoint(path) as ckpt:
        assert all(torch.equal(ckpt[key], tensor) for key, tensor in tensors.items())


def test_fallback_pread_leaves_the_descriptor_usable_by_other_threads(tmp_path):
    """The reader thread and the hasher share one descriptor; a seek+read pair must never interleave."""
    data = bytes(range(256)) * 4096
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    fd = fileio.open_for_reading(path)
    errors = []

    def reader(seed):
        offsets = [(seed * 7919 + i * 104729) % (len(data) - 4096) for i in range(300)]
        for offset in offsets:
            if pread(fd, 4096, offset) != data[offset:offset + 4096]:
                errors.append(offset)

    try:
        with use_positional_calls(False):
            threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        os.close(fd)
    assert errors == []


def test_pread_short_at_end_of_file_and_into_views(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"0123456789")
    fd = fileio.open_for_reading(path)
    try:
        for native in (True, False):
            with use_positional_calls(native):
                assert pread(fd, 4, 8) == b"89"
                assert pread(fd, 4, 20) == b""
                buffer = bytearray(3)
                assert pread_into(fd, memoryview(buffer), 2) == 3 and bytes(buffer) == b"234"
    finally:
        os.close(fd)


def test_fallback_pwrite_writes_at_offset_and_keeps_the_position(tmp_path):
    path = tmp_path / "out.bin"
    for native in (True, False):
        with open(path, "wb", buffering=0) as file, use_positional_calls(native):
            file.write(b"a" * 10)
            pwrite(file.fileno(), b"XY", 2)
            file.write(b"b")  # appended where the sequential writes left off
        assert path.read_bytes() == b"aaXYaaaaaab"


def test_writer_and_running_hash_work_without_positional_calls(tmp_path, windows_io):
    """The header is rewritten at offset 0 (hashes known only at the end); the hasher reads skipped bytes."""
    specs = [TensorSpec(f"k{i}", torch.float32, (1000,)) for i in range(5)]
    target = tmp_path / "out.safetensors"
    with SafetensorsWriter(target, specs, metadata={"a": "1"}, reserve=256) as out:
        for i, spec in enumerate(specs):
            out.write(spec.key, torch.full(spec.shape, float(i)))
        out.rewrite_metadata({"a": "1", "sha": "x" * 64})
    with open_checkpoint(target) as ckpt:
        assert ckpt.metadata["sha"] == "x" * 64
        assert torch.equal(ckpt["k3"], torch.full((1000,), 3.0))
    fd = fileio.open_for_reading(target)
    try:
        running = RunningHash(fd, os.fstat(fd).st_size)
        running.feed(500, pread(fd, 100, 500))  # bytes 0..500 are read by the hasher itself
        assert running.hexdigest() == hashlib.sha256(target.read_bytes()).hexdigest()
    finally:
        os.close(fd)


def test_map_without_madvise(tmp_path, monkeypatch):
    """Windows' mmap has no ``madvise``: mapping still gives the tensor's bytes, copy-on-write."""
    path, tensors = _model(tmp_path)
    monkeypatch.setattr(checkpoint_module, "CAN_ADVISE", False)
    with open_checkpoint(path) as ckpt:
        for key in ("k0", "k7", "z"):
            mapped = ckpt.map(key)
            assert torch.equal(mapped, tensors[key]), key
            mapped.zero_()  # copy-on-write: the file is unchanged
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt["k7"], tensors["k7"])


def test_binary_flag_is_used_for_model_files(monkeypatch, tmp_path):
    """Windows opens descriptors in text mode unless O_BINARY is given: reads would stop at 0x1A."""
    path, tensors = _model(tmp_path)
    seen = []
    real_open, native = os.open, hasattr(os, "O_BINARY")
    flag = getattr(os, "O_BINARY", 0x8000)
    if not native:  # Linux: a stand-in bit, taken off again before the real open
        monkeypatch.setattr(fileio, "BINARY", flag)
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (seen.append(flags),
                                                          real_open(p, flags if native else flags & ~flag, *a))[1])
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt["z"], tensors["z"])
    assert seen and all(flags & flag for flags in seen)


def test_utf8_console_on_a_cp1252_stream(monkeypatch):
    """A redirected stdout on Windows is cp1252: the estimate's "≈" would raise UnicodeEncodeError."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252", newline="\n")
    monkeypatch.setattr(sys, "stdout", stream)
    fileio.ensure_utf8_console()
    print("peak RAM ≈ 8 MB, A·(1−α)", file=stream)
    stream.flush()
    assert raw.getvalue().decode("utf-8") == "peak RAM ≈ 8 MB, A·(1−α)\n"


def test_utf8_console_leaves_a_capable_stream_alone(monkeypatch):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-16")
    monkeypatch.setattr(sys, "stdout", stream)
    fileio.ensure_utf8_console()
    assert stream.encoding == "utf-16"


def test_folder_fsync_is_skipped_on_windows(monkeypatch, tmp_path):
    opened = []
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a))
    fileio.fsync_folder(tmp_path)
    assert opened == []


def test_a_device_without_fp8_widens_and_narrows_on_the_cpu_side(monkeypatch):
    """Apple's MPS holds no fp8 or fp64: such tensors are converted before the move (forced here on the CPU)."""
    import mergers.engine as engine

    monkeypatch.setitem(engine.DEVICE_LACKS, "cpu", frozenset({torch.float8_e4m3fn}))
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    widened = engine._widen(codes, torch.float32, torch.device("cpu"), pool=None)
    expected = codes.float()
    assert torch.equal(widened.isnan(), expected.isnan())
    assert torch.equal(widened.nan_to_num(), expected.nan_to_num())
    narrowed = engine._narrow(torch.tensor([0.5, -3.0, 448.0]), torch.float8_e4m3fn, pool=None)
    assert narrowed.dtype == torch.float8_e4m3fn and narrowed.float().tolist() == [0.5, -3.0, 448.0]


def test_mps_asked_for_where_there_is_none_merges_on_the_cpu(monkeypatch):
    import mergers.engine as engine

    monkeypatch.setattr(engine, "_mps_available", lambda: False)
    assert engine.resolve_device("mps") == torch.device("cpu")
