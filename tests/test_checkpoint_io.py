"""Reading and writing checkpoints: golden bytes, round trips, hashes, bad files, atomic saves."""

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mergers.checkpoint import open_checkpoint
from mergers.errors import CheckpointError, OutputError, UnsafeCheckpointError
from mergers.hashing import legacy_hash, sha256_of_file
from mergers.writer import TEMP_MARK, SafetensorsWriter, TensorSpec, encode_header, save_checkpoint
from platforms import needs_proc, needs_real_symlinks, needs_rlimit

ROOT = Path(__file__).resolve().parents[1]


def test_header_golden_bytes():
    header = encode_header([TensorSpec("w", torch.float16, (2, 2))], None)
    body = b'{"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}'
    body += b" " * (-len(body) % 8)
    assert header == struct.pack("<Q", len(body)) + body


def test_written_file_is_exact_bytes(tmp_path):
    path = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]).half()})
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert raw[8 + length:] == torch.tensor([1.0, 2.0, 3.0, 4.0]).half().numpy().tobytes()
    assert length % 8 == 0


def test_round_trip_with_safetensors_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "ids": torch.arange(77).reshape(1, 77),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
    }
    path = save_checkpoint(tmp_path / "x.safetensors", tensors, metadata={"k": "v"})
    theirs = safetensors.torch.load_file(path)
    with open_checkpoint(path) as ours:
        assert ours.metadata == {"k": "v"}
        for key, tensor in tensors.items():
            assert torch.equal(ours[key], tensor) and torch.equal(theirs[key], tensor)


def test_reads_files_written_by_safetensors_in_file_order(tmp_path):
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file({"z": torch.ones(2), "a": torch.zeros(3, dtype=torch.float16)}, path)
    with open_checkpoint(path) as ckpt:
        offsets = [ckpt._infos[k].start for k in ckpt]
        assert offsets == sorted(offsets)
        assert set(ckpt) == {"z", "a"} and ckpt.shape("a") == (3,) and ckpt.dtype("a") == torch.float16


def test_output_dtype_casts_floats_only(tmp_path):
    path = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.randn(4), "ids": torch.arange(4)}, dtype="bf16")
    with open_checkpoint(path) as ckpt:
        assert ckpt.dtype("w") == torch.bfloat16 and ckpt.dtype("ids") == torch.int64


def test_hashes_match_a1111_definitions(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.safetensors"
    data = os.urandom(0x100000 + 0x20000)
    path.write_bytes(data)
    assert sha256_of_file(path) == hashlib.sha256(data).hexdigest()
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text(encoding="utf-8"))  # cached
    path.write_bytes(data[::-1])  # a changed file is hashed again
    assert sha256_of_file(path) == hashlib.sha256(data[::-1]).hexdigest()


def test_pickle_checkpoint_unwraps_state_dict(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt) == ["w"] and torch.equal(ckpt["w"], torch.ones(2))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.ones(1)}, "x": _Evil(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt.*safetensors"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: raw[:5], "truncated"),
    (lambda raw: raw[:-3], "truncated"),
    (lambda raw: struct.pack("<Q", 2**40) + raw[8:], "too large"),
    (lambda raw: raw[:8] + b"\xff" * (len(raw) - 8), "bad safetensors header"),
    (lambda raw: _replace_header(raw, {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}), "unknown dtype"),
    (lambda raw: _replace_header(raw, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), "needs 12 bytes"),
    (lambda raw: _replace_header(raw, {"w": {"dtype": "F32", "shape": [2]}}), "bad header entry"),
    (lambda raw: _replace_header(raw, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), "overlaps"),
    (lambda raw: _replace_header(raw, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), "truncated"),
    (lambda raw: _replace_header(raw, [1, 2]), "not a JSON object"),
    (lambda raw: _replace_header(raw, {"__metadata__": {"a": 1}}), "metadata"),
])
def test_bad_safetensors_files_get_clear_errors(tmp_path, mangle, message):
    good = save_checkpoint(tmp_path / "good.safetensors", {"w": torch.ones(2)}).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle(good))
    with pytest.raises(CheckpointError, match=message) as caught:
        open_checkpoint(bad)
    assert "bad.safetensors" in str(caught.value)


def _replace_header(raw: bytes, header) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + raw[8 + length:]


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "m.gguf")


def test_refuses_existing_output_unless_overwrite(tmp_path):
    path = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(1)})
    with pytest.raises(OutputError, match="exists"):
        save_checkpoint(path, {"w": torch.zeros(1)})
    save_checkpoint(path, {"w": torch.zeros(1)}, overwrite=True)
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.zeros(1))


@needs_real_symlinks
def test_never_overwrites_an_input_even_through_a_symlink(tmp_path):
    source = save_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    for target in (source, link, tmp_path / "." / "a.safetensors"):
        with pytest.raises(OutputError, match="input"):
            save_checkpoint(target, {"w": torch.zeros(1)}, overwrite=True, protect=[source])
    assert torch.equal(safetensors.torch.load_file(source)["w"], torch.ones(1))


def test_failed_stream_leaves_no_file(tmp_path):
    target = tmp_path / "out.safetensors"
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(target, specs) as out:
            out.write("a", torch.ones(2))
            raise RuntimeError("merge failed half way")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="expected 'b'"):
        with SafetensorsWriter(target, specs) as out:
            out.write("a", torch.ones(2))
            out.write("c", torch.ones(2))
    with pytest.raises(OutputError, match="ended before 'b'"):
        with SafetensorsWriter(target, specs) as out:
            out.write("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


@needs_rlimit
def test_disk_full_leaves_no_file(tmp_path):
    """``ulimit -f`` stands in for a full disk: the write fails, nothing is left."""
    target = tmp_path / "big.safetensors"
    script = (
        "import torch, resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20));"
        "from mergers.writer import save_checkpoint;"
        f"save_checkpoint({str(target)!r}, {{'w': torch.zeros(1 << 20)}})"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "write failed" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_output_and_next_save_sweeps_its_temp(tmp_path):
    target = tmp_path / "out.safetensors"
    script = (
        "import time, torch; from mergers.writer import SafetensorsWriter, TensorSpec;"
        "specs = [TensorSpec(str(i), torch.float32, (1024,)) for i in range(100)];"
        f"out = SafetensorsWriter({str(target)!r}, specs);"
        "[(out.write(str(i), torch.zeros(1024)), print(i, flush=True), time.sleep(0.05)) for i in range(100)]"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"  # it is writing
    proc.kill()  # SIGKILL; TerminateProcess on Windows
    proc.wait()
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if TEMP_MARK in p.name]  # the kill left its temp file
    save_checkpoint(tmp_path / "next.safetensors", {"w": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next.safetensors"]


def test_old_lightning_ckpt_loads_without_running_its_objects(tmp_path, monkeypatch):
    """Real SD1 .ckpt files carry a Lightning callback object and a numpy global_step."""
    import types

    import numpy

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "x"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": numpy.int64(470000),
                "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without Lightning
    with open_checkpoint(path) as ckpt:
        assert list(ckpt) == ["w"]


def test_ckpt_allowlist_on_the_a1111_package_line():
    """A1111 v1.10 pins numpy 1.26, whose empty ``numpy._core`` stub once hid every numpy entry of the
    allowlist: run the pickle tests under that line (the Gradio 3.41 venv) as well as under numpy 2 here."""
    from gradio3 import GRADIO3_PYTHON

    if not GRADIO3_PYTHON.exists() or os.name == "nt":
        pytest.skip(f"{GRADIO3_PYTHON} missing: build the Gradio 3.41.2 venv (make test does)")
    done = subprocess.run([str(GRADIO3_PYTHON), "-c", "import numpy; print(numpy.__version__)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("1."), done.stdout
    done = subprocess.run([str(GRADIO3_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "lightning or pickle"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout + done.stderr


def test_background_writes_keep_order_and_surface_errors(tmp_path):
    from mergers.writer import BackgroundWrites

    specs = [TensorSpec(str(i), torch.float32, (3,)) for i in range(20)]
    with SafetensorsWriter(tmp_path / "ok.safetensors", specs) as out, BackgroundWrites(out) as writes:
        for i in range(20):
            writes.write(str(i), torch.full((3,), float(i)))
    loaded = safetensors.torch.load_file(tmp_path / "ok.safetensors")
    assert [loaded[str(i)][0].item() for i in range(20)] == list(range(20))
    with pytest.raises(OutputError, match="expected '1'"):
        with SafetensorsWriter(tmp_path / "bad.safetensors", specs) as out, BackgroundWrites(out) as writes:
            for i in (0, 5, 6, 7, 8, 9, 10):
                writes.write(str(i), torch.zeros(3))
    assert not (tmp_path / "bad.safetensors").exists()


# mapped tensors (the in-place swap's reads) -------------------------------------------------------
def mapped_files():
    """The checkpoint files this process has mapped now."""
    return [line.split()[-1] for line in Path("/proc/self/maps").read_text(encoding="utf-8").splitlines()
            if line.endswith(".safetensors")]


@needs_proc
def test_map_gives_the_read_tensors_copy_on_write_and_unmaps_when_dropped(tmp_path):
    import gc

    from mergers.demo import tiny_state_dict

    path = save_checkpoint(tmp_path / "m.safetensors", tiny_state_dict("sd1", seed=4))
    before = path.read_bytes()
    with open_checkpoint(path) as ckpt:
        for key in ckpt:
            mapped, read = ckpt.map(key), ckpt[key]
            assert mapped.dtype == read.dtype and torch.equal(mapped, read), key
        key = next(k for k in ckpt if ckpt.dtype(k).is_floating_point and len(ckpt.shape(k)) == 2)
        tensor = ckpt.map(key)
        tensor.zero_()  # a method may work in place on its inputs: the file never sees it
        assert str(path) in mapped_files()
        del tensor, mapped, read
        gc.collect()
        assert str(path) not in mapped_files()
    assert path.read_bytes() == before


def test_map_falls_back_to_a_read_while_the_file_is_hashed_from_its_reads(tmp_path, monkeypatch):
    from mergers.demo import tiny_state_dict

    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_state_dict("sd1", seed=4))
    with open_checkpoint(path) as ckpt:
        assert ckpt.hash_while_reading()
        for key in ckpt:
            ckpt.map(key)
        assert ckpt.sha256() == sha256_of_file(path)  # every byte went through the running hash
    assert str(path) not in mapped_files()


def test_map_after_close_is_a_clear_error(tmp_path):
    from mergers.demo import tiny_state_dict

    path = save_checkpoint(tmp_path / "m.safetensors", tiny_state_dict("sd1", seed=4))
    ckpt = open_checkpoint(path)
    key = next(iter(ckpt))
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.map(key)
