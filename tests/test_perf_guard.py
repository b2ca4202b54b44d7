"""Cheap guards for the streaming promise: each input byte is read once, and a merge
holds a few tensors of memory, never a model.

The models are the real SD1 key layout at 1/8 of each dimension (~34 MB each), big
enough that tensors go through the engine's buffer pool. Memory is measured with
glibc's ``mallinfo2`` (every malloc'd byte: torch's tensors and numpy's pooled
buffers alike; tracemalloc does not see torch), sampled at every key the merge
hands out. A control run that keeps every merged tensor shows the measure sees a
whole model when there is one.

Example:
    python -m pytest tests/test_perf_guard.py -q
"""

import ctypes
import ctypes.util
import platform

import pytest
import torch

from mergers.arch import key_specs
from mergers.checkpoint import BufferPool, SafetensorsCheckpoint, open_checkpoint
from mergers.engine import run_plan
from mergers.merge import merge_to_file, open_sources
from mergers.plan import plan_merge
from mergers.recipe import Recipe
from mergers.writer import save_checkpoint

SCALE = 8  # 1/8 per dimension: the largest tensor is ~1.2 MB, a model ~34 MB
KEEP_DIMS_UP_TO = 9  # channel counts and 3x3 kernels keep their size, as in mergers.demo


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


def medium_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Every required SD1 key at 1/SCALE of each larger dimension, fp16 random values."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in key_specs("sd1"):
        if spec.optional:
            continue
        if spec.dtype.startswith("int"):
            tensors[spec.key] = torch.arange(spec.shape[-1]).reshape(spec.shape)
            continue
        shape = tuple(n if n <= KEEP_DIMS_UP_TO else n // SCALE for n in spec.shape)
        tensors[spec.key] = torch.randn(shape, generator=generator).half()
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("perf_models")
    paths = []
    for seed in (1, 2, 3):
        path = folder / f"m{seed}.safetensors"
        save_checkpoint(path, medium_state_dict(seed))
        paths.append(path)
    return paths


def tensor_bytes(path) -> dict[str, int]:
    with open_checkpoint(path) as ckpt:
        return {key: ckpt.read(key).nbytes for key in ckpt}


# -- each byte read once --------------------------------------------------------------------------


# Which inputs a step of each action reads (A, B, C by position), as plan.py decides.
READS = {"merge": None, "copy_a": (0,), "copy_b": (1,)}


@pytest.mark.parametrize("mode", ["weight_sum", "add_difference"])
def test_every_input_byte_is_read_once(tmp_path, monkeypatch, models, mode):
    reads = []
    original = SafetensorsCheckpoint._read

    def recording_read(self, key, pool=None):
        tensor = original(self, key, pool)
        reads.append((self.path, key, tensor.nbytes))
        return tensor

    monkeypatch.setattr(SafetensorsCheckpoint, "_read", recording_read)
    inputs = models if mode == "add_difference" else models[:2]
    recipe = Recipe(model_a=str(inputs[0]), model_b=str(inputs[1]),
                    model_c=str(inputs[2]) if mode == "add_difference" else None, mode=mode, alpha=0.5)
    result = merge_to_file(recipe, tmp_path / "out.safetensors")

    wanted = set()
    for step in result.plan.steps:
        for index in READS[step.action] or range(len(inputs)):
            wanted.add((inputs[index], step.key))
    read_keys = [(path, key) for path, key, _ in reads]
    assert len(read_keys) == len(set(read_keys)), "a tensor was read twice"
    assert set(read_keys) == wanted
    a_bytes = sum(n for path, _, n in reads if path == inputs[0])
    assert a_bytes == sum(tensor_bytes(inputs[0]).values())  # A: all of it, once


def test_bytes_read_counts_what_was_read(models):
    with open_checkpoint(models[0]) as ckpt:
        key = next(iter(ckpt))
        tensor = ckpt.read(key, pool=BufferPool(keep_bytes=1 << 20, min_bytes=0))
        assert ckpt.bytes_read == tensor.nbytes


# -- a few tensors of memory ----------------------------------------------------------------------


def _mallinfo2():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    function = getattr(libc, "mallinfo2", None)
    if function is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to count malloc'd bytes")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    function.restype = MallInfo2
    return function


def malloced_bytes(mallinfo2) -> int:
    """Bytes malloc has handed out and not had back: heap chunks in use plus mmapped blocks."""
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def peak_growth_during_merge(models, *, keep: bool, readahead: int) -> int:
    """The most malloc'd bytes above the start, sampled as each merged key is handed out.

    The consumer only looks at each tensor (the writer holds none; its fsync would only slow the test)."""
    mallinfo2 = _mallinfo2()
    recipe = Recipe(model_a=str(models[0]), model_b=str(models[1]), alpha=0.3)
    kept = []
    with open_sources(recipe) as sources:
        plan = plan_merge(recipe, sources)
        start = peak = malloced_bytes(mallinfo2)
        for _, tensor in run_plan(plan, sources, device="cpu", readahead_bytes=readahead):
            if keep:
                kept.append(tensor)
            peak = max(peak, malloced_bytes(mallinfo2))
    return peak - start


@pytest.mark.skipif(platform.system() != "Linux", reason="mallinfo2 is glibc's")
def test_a_merge_holds_a_few_tensors_never_a_model(models):
    sizes = tensor_bytes(models[0])
    largest, model = max(sizes.values()), sum(sizes.values())
    readahead = 2 * largest
    # In flight at most: the read-ahead, one step's inputs (A, B), its result, and idle pool buffers.
    bound = readahead + 8 * largest
    assert bound < model / 2  # so the bound means something

    growth = peak_growth_during_merge(models, keep=False, readahead=readahead)
    assert growth < bound, f"merge held {growth / 2**20:.1f} MiB; a few tensors are {bound / 2**20:.1f} MiB"

    # Control: a consumer that keeps every result holds a model, and the measure sees it.
    hoarded = peak_growth_during_merge(models, keep=True, readahead=readahead)
    assert hoarded > model * 0.9


def test_the_pool_reuses_buffers_once_their_tensors_are_gone():
    pool = BufferPool(keep_bytes=8 << 20, min_bytes=0)
    first = pool.take(1 << 20)
    view = first.view(torch.float16)[:10]
    del first
    second = pool.take(1 << 20)  # the view still holds the first buffer
    assert pool.allocated_bytes >= 2 << 20 and pool.reuses == 0
    del view, second
    for _ in range(10):
        pool.tensor(torch.float16, (512, 1024))  # 1 MiB each, dropped at once
    assert pool.reuses == 10 and pool.allocated_bytes == 2 << 20


def test_the_pool_drops_idle_buffers_beyond_its_keep():
    pool = BufferPool(keep_bytes=3 << 20, min_bytes=0)
    lent = [pool.take(1 << 20) for _ in range(6)]
    del lent
    pool.take(4 << 20)  # fits none of the idle 1 MiB buffers: idle ones are dropped to make room
    assert pool.held_bytes <= (3 << 20) + (4 << 20)


def test_small_requests_bypass_the_pool():
    pool = BufferPool(keep_bytes=1 << 20)
    pool.take(1024)
    assert pool.allocated_bytes == 0
