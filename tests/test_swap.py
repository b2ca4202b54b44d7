"""Hot swap: merges copied into a loaded model in place, and the original put back bit for bit.

The loaded model is a real torch module with SD1.5's key names (tests/live_model.py),
loaded from a checkpoint file as A1111 loads one.
"""

import gc
import threading
import weakref

import pytest
import torch
from live_model import FakeLive, hijacked_name, module_from_state_dict, read_file
from platforms import needs_proc

from mergers import swap
from mergers.demo import tiny_state_dict
from mergers.errors import MergeCancelled, MergeError
from mergers.merge import merge_stream, merge_to_file
from mergers.recipe import Recipe
from mergers.swap import Swapper, SwapReport, live_tensors, strip_wrapped
from mergers.writer import save_checkpoint

TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OUT_WEIGHT = "model.diffusion_model.out.2.weight"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three fp16 SD1 models, one fp32 model, and two merges of the first two saved to files."""
    folder = tmp_path_factory.mktemp("swap")
    paths = {}
    for name, seed, dtype in (("a", 1, torch.float16), ("b", 2, torch.float16), ("c", 3, torch.float16),
                              ("a32", 1, torch.float32)):
        paths[name] = save_checkpoint(folder / f"{name}.safetensors", tiny_state_dict("sd1", seed=seed, dtype=dtype))
    for name, alpha in (("ab3", 0.3), ("ab7", 0.7)):
        merge_to_file(recipe(paths, alpha), folder / f"{name}.safetensors")
        paths[name] = folder / f"{name}.safetensors"
    return paths


@pytest.fixture(scope="module")
def merges(models):
    """The two merges' pairs, computed once; tests of the engine's own generator call merge_stream."""
    return {alpha: list(merge_stream(recipe(models, alpha))) for alpha in (0.3, 0.7)}


@pytest.fixture(scope="module")
def files(models):
    """Every test file's tensors, read once."""
    return {name: read_file(path) for name, path in models.items()}


def recipe(paths, alpha, a="a", b="b"):
    return Recipe(model_a=str(paths[a]), model_b=str(paths[b]), alpha=alpha)


def assert_same(live, expected):
    """Every live tensor equals ``expected`` (cast to the live dtype), bit for bit."""
    tensors = live.tensors()
    assert tensors.keys() <= expected.keys()
    for key, tensor in tensors.items():
        assert same_bytes(tensor.detach().cpu(), expected[key].to(tensor.dtype)), key


def same_bytes(a, b):
    """Bitwise equality (NaNs included), dtypes and shapes too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_original(live, original):
    for key, tensor in live.tensors().items():
        assert same_bytes(tensor.detach().cpu(), original[key]), key


def failing_after(pairs, count, error):
    """A stream that yields ``count`` pairs, then raises ``error``."""
    for n, pair in enumerate(pairs):
        if n == count:
            raise error
        yield pair


# names ----------------------------------------------------------------------

def test_strip_wrapped_gives_the_checkpoint_key():
    hijacked = "cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight"
    assert strip_wrapped(hijacked) == TOKEN_EMBEDDING
    assert strip_wrapped("conditioner.embedders.0.wrapped.transformer.text_model.final_layer_norm.bias") == \
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"
    assert strip_wrapped(OUT_WEIGHT) == OUT_WEIGHT
    assert strip_wrapped("model.unwrapped.wrapped_x.weight") == "model.unwrapped.wrapped_x.weight"


def test_live_tensors_maps_parameters_and_buffers_keeping_the_first_of_two_names():
    module = module_from_state_dict({"a.wrapped.w": torch.ones(2), "a.w": torch.zeros(2),
                                     "a.ids": torch.arange(3)})
    tensors = live_tensors(module)
    assert set(tensors) == {"a.w", "a.ids"}
    first = next(t for name, t in module.named_parameters() if strip_wrapped(name) == "a.w")
    assert tensors["a.w"] is first  # the live object itself, not a copy
    assert tensors["a.ids"] is module.a.ids
    assert set(live_tensors(module, rename=str)) == {"a.wrapped.w", "a.w", "a.ids"}


def test_module_from_state_dict_has_exactly_the_keys_with_clones():
    state = tiny_state_dict("sd1", seed=4, optional=True)
    module = module_from_state_dict(state)
    assert sorted(module.state_dict()) == sorted(state)
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, state[key]) and tensor.data_ptr() != state[key].data_ptr()
    buffers = {name for name, _ in module.named_buffers()}
    assert buffers == {key for key, tensor in state.items() if not tensor.is_floating_point()}


def test_hijacked_module_names_map_back_to_checkpoint_keys(models, files):
    live = FakeLive.load(models["a"], hijack=True)
    names = [name for name, _ in live.module.named_parameters()]
    assert hijacked_name(TOKEN_EMBEDDING) in names
    assert set(live.tensors()) == set(files["a"])


# rounding as A1111 loads -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_copy_into_a_narrow_tensor_rounds_exactly_like_a1111s_half(dtype):
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3
    tiny = torch.finfo(dtype).tiny
    edges = torch.tensor([0.0, -0.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0, 1e6, -1e6, tiny / 3,
                          float("inf"), float("-inf"), float("nan"), 2**-24, 2**-25, 3 * 2**-26])
    source = torch.cat([values, values * 1e-4, values * 1e4, edges])
    copied = torch.empty_like(source, dtype=dtype).copy_(source)
    converted = source.half() if dtype == torch.float16 else source.bfloat16()
    assert same_bytes(copied, converted)


# apply ----------------------------------------------------------------------

def test_apply_gives_the_merged_file_in_place_without_rebuilding(models, files):
    live = FakeLive.load(models["a"])
    objects = {key: (id(t), t.data_ptr()) for key, t in live.tensors().items()}
    parameters = [id(p) for p in live.module.parameters()]
    report = Swapper(live).apply(merge_stream(recipe(models, 0.3)))
    assert isinstance(report, SwapReport)
    assert report.changed == len(files["ab3"]) and report.missing == ()
    assert_same(live, files["ab3"])
    assert {key: (id(t), t.data_ptr()) for key, t in live.tensors().items()} == objects
    assert [id(p) for p in live.module.parameters()] == parameters
    assert (live.before_calls, live.after_calls) == (1, [True])


def test_restore_gives_back_the_files_bytes(models, merges, files):
    live = FakeLive.load(models["a"])
    original = files["a"]
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    assert swapper.merged and len(swapper.changed_keys) == len(original)
    assert swapper.restore() == len(original)
    assert_original(live, original)
    assert not swapper.merged and swapper.changed_keys == frozenset()
    assert live.events == ["before", "after", "before", "after"] and live.after_calls == [True, False]


def test_restore_of_an_fp32_file_loaded_into_an_fp16_model_is_exact(models, files):
    live = FakeLive.load(models["a32"], dtype=torch.float16)  # as A1111: load fp32, then .half()
    original = live.snapshot()
    assert original[OUT_WEIGHT].dtype == torch.float16
    swapper = Swapper(live)
    swapper.apply(merge_stream(recipe(models, 0.3, a="a32")))
    assert not same_bytes(live.tensors()[OUT_WEIGHT].detach(), original[OUT_WEIGHT])
    swapper.restore()
    assert_original(live, original)
    assert_original(live, {k: t.half() if t.is_floating_point() else t for k, t in files["a32"].items()})


def test_restore_with_nothing_merged_does_nothing(models):
    live = FakeLive.load(models["a"])
    assert Swapper(live).restore() == 0
    assert live.events == []


def test_two_merges_in_a_row_then_restore(models, merges, files):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    swapper.apply(merges[0.7])
    assert_same(live, files["ab7"])
    swapper.restore()
    assert_original(live, original)


def test_a_merge_that_skips_keys_an_earlier_merge_changed_puts_those_back(models, merges, files):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    second = [(k, t) for k, t in merges[0.7] if not k.startswith("first_stage_model.")]
    report = swapper.apply(second)
    vae = [k for k in original if k.startswith("first_stage_model.")]
    assert report.reverted == len(vae) and report.changed == len(second)
    merged = files["ab7"]
    for key, tensor in live.tensors().items():
        assert same_bytes(tensor.detach(), original[key] if key in vae else merged[key]), key
    assert swapper.changed_keys == {k for k, _ in second}


def test_an_empty_merge_after_a_merge_leaves_the_source_and_tells_the_host(models, merges, files):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    report = swapper.apply([])
    assert (report.changed, report.reverted) == (0, len(original))
    assert_original(live, original)
    assert not swapper.merged and live.events == ["before", "after"] * 2 and live.after_calls == [True, False]


def test_keys_the_live_model_lacks_are_reported_not_fatal(models, merges, files):
    live = FakeLive.load(models["a"], keep=lambda key: not key.startswith("first_stage_model."))
    report = Swapper(live).apply(merges[0.3])
    vae = [k for k in files["ab3"] if k.startswith("first_stage_model.")]
    assert report.missing == tuple(vae) and report.changed == len(live.tensors())
    assert_same(live, files["ab3"])


def test_an_empty_stream_changes_nothing_and_calls_nothing(models):
    live = FakeLive.load(models["a"])
    report = Swapper(live).apply([])
    assert (report.changed, report.missing, live.events) == (0, (), [])


# failures --------------------------------------------------------------------

def test_a_stream_that_fails_half_way_leaves_the_original(models):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    with pytest.raises(RuntimeError, match="disk on fire"):
        swapper.apply(failing_after(merge_stream(recipe(models, 0.3)), 100, RuntimeError("disk on fire")))
    assert_original(live, original)
    assert not swapper.merged and swapper.backup_bytes == 0
    assert live.events == ["before", "after"] and live.after_calls == [False]


def test_cancel_half_way_restores_and_raises(models):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    cancel = threading.Event()
    closed = []

    def stream():
        try:
            for n, pair in enumerate(merge_stream(recipe(models, 0.3))):
                if n == 100:
                    cancel.set()  # as the Stop button does, from another thread
                yield pair
        finally:
            closed.append(True)

    pairs = stream()  # held here, so only apply can have closed it (not garbage collection)
    with pytest.raises(MergeCancelled):
        Swapper(live).apply(pairs, cancel=cancel)
    assert_original(live, original)
    assert live.after_calls == [False]
    assert closed == [True]  # the merge stream's files and reader thread are released at once


def test_the_engines_own_cancel_restores_too(models):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    cancel = threading.Event()
    calls = []

    def progress(done, total, key):
        calls.append(key)
        if len(calls) == 50:
            cancel.set()

    with pytest.raises(MergeCancelled):
        Swapper(live).apply(merge_stream(recipe(models, 0.3), on_progress=progress, cancel=cancel))
    assert_original(live, original)


def test_a_failed_second_merge_goes_back_to_the_original(models, merges):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    with pytest.raises(RuntimeError):
        swapper.apply(failing_after(merges[0.7], 100, RuntimeError("boom")))
    assert_original(live, original)
    assert live.after_calls == [True, False]


def test_a_merge_after_a_failed_merge_works(models, merges, files):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    with pytest.raises(RuntimeError):
        swapper.apply(failing_after(merges[0.3], 500, RuntimeError("boom")))
    swapper.apply(merges[0.7])
    assert_same(live, files["ab7"])
    swapper.restore()
    assert_original(live, original)


def test_a_shape_mismatch_names_the_key_and_restores(models, merges):
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    pairs = list(merges[0.3])
    key, tensor = pairs[200]
    pairs[200] = (key, tensor.reshape(-1)[:-1] if tensor.numel() > 1 else tensor.reshape(1, 1))
    with pytest.raises(MergeError) as error:
        Swapper(live).apply(pairs)
    assert key in str(error.value)
    assert str(list(pairs[200][1].shape)) in str(error.value) and str(list(tensor.shape)) in str(error.value)
    assert_original(live, original)
    assert live.after_calls == [False]


# originals the file cannot give back --------------------------------------------------

def with_extra_key(models, key="extra.weight", shape=(3, 5)):
    """A model loaded from A, plus a key its file lacks (e.g. a host-made tensor)."""
    state = read_file(models["a"])
    state[key] = torch.randn(shape, generator=torch.Generator().manual_seed(9)).half()
    return FakeLive(module_from_state_dict(state), models["a"])


def test_a_key_the_source_file_lacks_is_restored_from_ram(models, merges):
    live = with_extra_key(models)
    original = live.snapshot()
    swapper = Swapper(live)
    merged = list(merges[0.3]) + [("extra.weight", torch.zeros(3, 5))]
    swapper.apply(merged)
    assert swapper.backup_bytes == 3 * 5 * 2  # that key only
    assert torch.equal(live.tensors()["extra.weight"], torch.zeros(3, 5, dtype=torch.float16))
    swapper.restore()
    assert_original(live, original)
    assert swapper.backup_bytes == 0


def test_a_key_whose_file_shape_differs_is_kept_in_ram(models, files):
    state = dict(files["a"])  # a copy: the cached dict is shared
    state[OUT_WEIGHT] = state[OUT_WEIGHT].reshape(-1).clone()  # the live model holds it flat
    live = FakeLive(module_from_state_dict(state), models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    swapper.apply([(OUT_WEIGHT, torch.zeros_like(state[OUT_WEIGHT]))])
    assert swapper.backup_bytes == state[OUT_WEIGHT].nbytes
    swapper.restore()
    assert_original(live, original)


def test_the_ram_backup_sees_the_weights_without_the_hosts_patches(models):
    """A1111's Lora keeps patched weights until before_change takes the patch out: back up after that."""
    live = with_extra_key(models)
    clean = live.snapshot()["extra.weight"]
    with torch.no_grad():
        live.tensors()["extra.weight"].mul_(2)  # a patch applied to the live weight (exact, unlike +1 in fp16)

    def unpatch(fake):
        with torch.no_grad():
            fake.tensors()["extra.weight"].div_(2)
        fake.on_before = None

    live.on_before = unpatch
    swapper = Swapper(live)
    swapper.apply([("extra.weight", torch.zeros(3, 5))])
    swapper.restore()
    assert same_bytes(live.tensors()["extra.weight"].detach(), clean)


def test_no_source_file_backs_up_within_the_limit_then_refuses(models, merges, files):
    state = dict(files["a"])  # a copy: the cached dict is shared
    live = FakeLive(module_from_state_dict(state), None)
    original = live.snapshot()
    swapper = Swapper(live, backup_limit=state[OUT_WEIGHT].nbytes + 10)
    swapper.apply([(OUT_WEIGHT, torch.zeros_like(state[OUT_WEIGHT]))])
    swapper.restore()
    assert_original(live, original)
    with pytest.raises(MergeError, match="MiB"):
        swapper.apply(merges[0.3])
    assert_original(live, original)
    assert swapper.backup_bytes == 0


def test_restore_without_a_source_file_is_a_clear_error(models, merges):
    live = FakeLive.load(models["a"])
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    live.source = None
    with pytest.raises(MergeError, match="no source file"):
        swapper.restore()
    assert swapper.merged and live.after_calls == [True, True]


def test_restore_refuses_a_source_file_rewritten_since_the_merge(models, tmp_path, merges, files):
    path = save_checkpoint(tmp_path / "a.safetensors", files["a"])
    live = FakeLive.load(path)
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    save_checkpoint(path, files["c"], overwrite=True)  # e.g. a save over the loaded model
    with pytest.raises(MergeError, match="changed on disk"):
        swapper.restore()
    assert swapper.merged


# hosts' quirks ---------------------------------------------------------------------

def test_hijacked_names_are_swapped_and_restored(models, merges, files):
    live = FakeLive.load(models["a"], hijack=True)
    original = live.snapshot()
    swapper = Swapper(live)
    report = swapper.apply(merges[0.3])
    assert report.missing == () and TOKEN_EMBEDDING in swapper.changed_keys
    wrapped = live.module.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
    assert torch.equal(wrapped.weight, files["ab3"][TOKEN_EMBEDDING])
    swapper.restore()
    assert_original(live, original)


def test_buffers_made_under_inference_mode_are_swapped(models, files):
    state = dict(files["a"])  # a copy: the cached dict is shared
    live = FakeLive(module_from_state_dict(state), models["a"])
    with torch.inference_mode():
        buffer = torch.ones(4)
    live.module.register_buffer("made_in_inference", buffer)
    swapper = Swapper(live)
    swapper.apply([("made_in_inference", torch.zeros(4))])
    assert torch.equal(live.module.made_in_inference, torch.zeros(4))
    swapper.restore()
    assert torch.equal(live.module.made_in_inference, torch.ones(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_is_swapped_and_restored(models, files):
    live = FakeLive.load(models["a"], device="cuda")
    original = live.snapshot()
    swapper = Swapper(live)
    swapper.apply(merge_stream(recipe(models, 0.3)))
    assert_same(live, files["ab3"])
    swapper.restore()
    assert_original(live, original)


# memory ------------------------------------------------------------------------------

class AliveCounter:
    """Counts how many of the tensors it tracked are alive at once."""

    def __init__(self):
        self.alive = 0
        self.peak = 0

    def track(self, tensor):
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self._gone)
        return tensor

    def _gone(self):
        self.alive -= 1


def test_apply_holds_a_tensor_at_a_time_and_keeps_none(models):
    live = FakeLive.load(models["a"])
    counter = AliveCounter()
    swapper = Swapper(live)
    pairs = ((key, counter.track(tensor)) for key, tensor in merge_stream(recipe(models, 0.3)))
    swapper.apply(pairs)
    gc.collect()
    assert counter.peak <= 2 and counter.alive == 0  # no stream tensor is kept
    assert swapper.backup_bytes == 0  # every original is in the file: nothing kept in RAM


def test_restore_reads_a_tensor_at_a_time(models, monkeypatch, merges):
    live = FakeLive.load(models["a"])
    swapper = Swapper(live)
    swapper.apply(merges[0.3])
    counter = AliveCounter()
    real_open = swap.open_checkpoint

    def counting_open(path):
        ckpt = real_open(path)
        read = ckpt._read
        ckpt._read = lambda key: counter.track(read(key))
        return ckpt

    monkeypatch.setattr(swap, "open_checkpoint", counting_open)
    swapper.restore()
    gc.collect()
    assert counter.peak <= 2 and counter.alive == 0
    assert counter.peak >= 1  # it did read


def test_a_hundred_merge_restore_cycles_give_back_the_same_bytes(tmp_path):
    """On a small model (the U-Net's first blocks, an int buffer, and a key the file lacks), so 100 cycles stay fast."""
    keep = ("model.diffusion_model.input_blocks.1.", "model.diffusion_model.input_blocks.2.",
            "cond_stage_model.transformer.text_model.embeddings.")
    a, b = ({k: t for k, t in tiny_state_dict("sd1", seed=seed).items() if k.startswith(keep)} for seed in (1, 2))
    path = save_checkpoint(tmp_path / "small.safetensors", a)
    state = {**read_file(path), "extra.weight": torch.ones(4, 4, dtype=torch.float16)}
    live = FakeLive(module_from_state_dict(state), path)
    original = live.snapshot()
    merges = [[(k, torch.lerp(a[k].float(), b[k].float(), alpha)) if a[k].is_floating_point() else (k, a[k])
               for k in a] + [("extra.weight", torch.full((4, 4), alpha))] for alpha in (0.3, 0.7)]
    swapper = Swapper(live)
    state_names = sorted(vars(swapper))
    for cycle in range(100):
        assert swapper.apply(merges[cycle % 2]).changed == len(state)
        assert swapper.backup_bytes == 4 * 4 * 2  # only the key the file lacks
        assert swapper.restore() == len(state)
        assert_original(live, original)
        assert not swapper.changed_keys and swapper.backup_bytes == 0 and sorted(vars(swapper)) == state_names
    assert live.after_calls == [True, False] * 100


def session_over_two_models(tmp_path, monkeypatch):
    """A MergeSession over tiny SD1 models a and b in tmp_path/models, with a loaded from its file."""
    from mergers.hosts.standalone import FolderHost
    from mergers.session import MergeSession

    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "models"
    folder.mkdir()
    for seed, name in ((1, "a"), (2, "b")):
        save_checkpoint(folder / f"{name}.safetensors", tiny_state_dict("sd1", seed=seed))
    live = FakeLive.load(folder / "a.safetensors")

    class Host(FolderHost):
        def live_model(self):
            return live

    return MergeSession(Host(folder, data_dir=tmp_path / "data")), live


def test_repeated_merges_through_the_session_do_not_grow_memory(tmp_path, monkeypatch):
    """The original's most reported bug: RAM grows with every merge. Ours stays flat (real merges, SD1 layout)."""
    import gc

    import psutil

    from mergers.recipe import Recipe

    session, _ = session_over_two_models(tmp_path, monkeypatch)
    process = psutil.Process()

    def cycles(count):
        for n in range(count):
            session.merge(Recipe(model_a="a", model_b="b", alpha=0.1 + 0.8 * (n % 2)))
            session.restore()
        gc.collect()
        return process.memory_info().rss

    warmed = cycles(5)
    after = cycles(25)
    assert after - warmed < 24 * 2**20, f"RSS grew by {(after - warmed) / 2**20:.1f} MiB over 25 merge/restore cycles"


# merging straight into the live tensors ------------------------------------------
def shares_live_memory(live, pairs):
    """Pass ``pairs`` through, noting per key whether the tensor is the live tensor's own memory."""
    tensors, seen = live.tensors(), {}

    def stream():
        for key, tensor in pairs:
            seen[key] = tensor.data_ptr() == tensors[key].data_ptr()
            yield key, tensor

    return stream(), seen


def test_a_weight_sum_is_computed_straight_into_the_live_tensors(models, files):
    """No copy of the model: the engine writes each merged key into its live parameter (target_for)."""
    live = FakeLive.load(models["a"])
    next(iter(live.module.parameters())).requires_grad_(True)  # out= must not trip autograd
    swapper = Swapper(live)
    stream, seen = shares_live_memory(live, merge_stream(recipe(models, 0.3), out_for=swapper.target_for))
    report = swapper.apply(stream)
    assert_same(live, files["ab3"])
    merged = [key for key, direct in seen.items() if direct]
    assert len(merged) > 0.9 * report.changed  # every merged float key; copied keys (ids) go the usual way
    original = read_file(models["a"])
    swapper.restore()
    assert_original(live, original)


def test_a_direct_merge_that_fails_half_way_puts_back_the_key_it_was_writing(models):
    """The key being computed when the stream fails was already written in place: it is restored too."""
    live = FakeLive.load(models["a"])
    original = live.snapshot()
    swapper = Swapper(live)
    stream = merge_stream(recipe(models, 0.3), out_for=swapper.target_for)
    with pytest.raises(RuntimeError, match="disk gone"):
        swapper.apply(failing_after(stream, 40, RuntimeError("disk gone")))
    stream.close()  # its reader thread ends now, not whenever the garbage collector gets to it
    assert_original(live, original)
    assert not swapper.merged


def test_target_for_gives_nothing_outside_apply_and_for_inference_tensors(models):
    live = FakeLive.load(models["a"])
    swapper = Swapper(live)
    assert swapper.target_for(OUT_WEIGHT) is None  # no apply running: nothing to account the original to
    with torch.inference_mode():
        frozen = torch.zeros(2)
    live.tensors = lambda: {OUT_WEIGHT: frozen}
    swapper._applying = swap._Applying(live.tensors(), {}, swap._HostCalls(live))
    assert swapper.target_for(OUT_WEIGHT) is None  # writable only inside inference_mode: copied as before


@needs_proc
def test_a_session_swap_maps_its_inputs_a_few_tensors_at_a_time_and_keeps_none(tmp_path, monkeypatch):
    """The swap reads A and B as mappings of the page cache (no copy); none outlives its key.
    (How many are mapped at once is the read-ahead's byte budget: here the tiny model fits in it.)"""
    import gc
    from pathlib import Path

    session, live = session_over_two_models(tmp_path, monkeypatch)
    folder = tmp_path / "models"
    most = []
    mapped_now = lambda: sum(line.endswith("b.safetensors") for line in Path("/proc/self/maps").read_text(encoding="utf-8").splitlines())  # noqa: E731
    session.merge(Recipe(model_a="a", model_b="b", alpha=0.3), on_progress=lambda *_: most.append(mapped_now()))
    gc.collect()
    assert max(most) > 0
    assert mapped_now() == 0
    merged = read_file(merge_to_file(Recipe(model_a=str(folder / "a.safetensors"), model_b=str(folder / "b.safetensors"),
                                            alpha=0.3), tmp_path / "ab.safetensors").path)
    assert_same(live, merged)
