"""The merge session: swap, history, save, restore, one merge at a time, safe output names."""

import contextlib
import threading

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.demo import tiny_state_dict
from mergers.errors import CheckpointError, MergeError, OutputError
from mergers.hosts.standalone import FolderHost
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.session import MergeBusy, MergeSession
from mergers.writer import save_checkpoint
from tests.live_model import FakeLive


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


class LiveFolderHost(FolderHost):
    """A folder host with a model loaded from model A's file."""

    def __init__(self, folder, live):
        super().__init__(folder, data_dir=folder / "data")
        self.live = live

    def live_model(self):
        return self.live


@pytest.fixture
def folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for seed, name in enumerate(("a", "b", "c"), start=1):
        save_checkpoint(models / f"{name}.safetensors", tiny_state_dict("sd1", seed=seed))
    return models


def test_merge_swaps_records_and_restores(folder, tmp_path):
    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    recipe = Recipe(model_a="a.safetensors", model_b="b", weights_alpha="GRAD_V")
    outcome = session.merge(recipe)
    assert outcome.swapped and outcome.history_id == 1 and "keys merged" in outcome.summary
    merge_to_file(recipe, tmp_path / "ref.safetensors", resolve=session.host.resolve)
    with open_checkpoint(tmp_path / "ref.safetensors") as ref:
        assert all(torch.equal(live.tensors()[k], ref[k]) for k in ref)
    assert session.recipe_from_history(-1).recipe == outcome.recipe
    assert session.restore() > 0
    with open_checkpoint(folder / "a.safetensors") as original:
        assert all(torch.equal(live.tensors()[k], original[k]) for k in original)


def test_save_streams_the_current_recipe_into_the_models_folder(folder):
    session = MergeSession(FolderHost(folder, data_dir=folder / "data"))
    with pytest.raises(MergeError, match="merge first"):
        session.save("x")
    outcome = session.merge(Recipe(model_a="a", model_b="b", alpha=0.25))
    assert not outcome.swapped and "Save writes it" in outcome.summary
    path = session.save("merged", dtype="bf16")
    assert path == folder / "merged.safetensors"
    with open_checkpoint(path) as saved:
        assert saved.dtype("model.diffusion_model.out.2.weight") == torch.bfloat16
    assert "merged.safetensors" in [m.title for m in session.host.list_models()]


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "sub/dir", "..", ""])
def test_save_refuses_names_that_leave_the_folder(folder, name):
    session = MergeSession(FolderHost(folder, data_dir=folder / "data"))
    session.merge(Recipe(model_a="a", model_b="b"))
    with pytest.raises(OutputError):
        session.save(name)


def test_models_resolve_only_inside_the_folder(folder):
    host = FolderHost(folder)
    assert host.resolve("a") == folder / "a.safetensors"
    for name in ("../models/a.safetensors", str(folder / "a.safetensors"), "/etc/passwd"):
        with pytest.raises(CheckpointError):
            host.resolve(name)


def test_a_second_merge_while_one_runs_is_refused(folder):
    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    started, release = threading.Event(), threading.Event()

    def slow_progress(done, total, key):
        started.set()
        release.wait(10)

    worker = threading.Thread(target=session.merge, args=(Recipe(model_a="a", model_b="b"),),
                              kwargs={"on_progress": slow_progress})
    worker.start()
    assert started.wait(10)
    with pytest.raises(MergeBusy, match="already running"):
        session.merge(Recipe(model_a="a", model_b="c"))
    release.set()
    worker.join(10)
    assert session.current is not None


def test_stop_cancels_and_restores(folder):
    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    before = {k: v.clone() for k, v in live.tensors().items()}

    def stop_half_way(done, total, key):
        if done == 100:
            session.stop()

    with pytest.raises(MergeError, match="cancelled"):
        session.merge(Recipe(model_a="a", model_b="b"), on_progress=stop_half_way)
    assert all(torch.equal(live.tensors()[k], v) for k, v in before.items())
    assert session.current is None


def test_generate_without_a_generator_says_so(folder):
    session = MergeSession(FolderHost(folder, data_dir=folder / "data"))
    with pytest.raises(MergeError, match="preview needs the web UI"):
        session.generate(session.host.default_generation())


def test_apply_stream_swaps_another_features_tensors_and_restores(folder):
    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    key = next(k for k in live.tensors() if k.endswith("proj_in.weight"))
    before = live.tensors()[key].clone()
    changed = session.apply_stream("a + lora", lambda cancel: [(key, before + 1)], info={"LoRA": "x:0.5"})
    assert changed == 1 and torch.equal(live.tensors()[key], before + 1)
    assert session.current.recipe is None and session.current.info == {"LoRA": "x:0.5"}
    with pytest.raises(MergeError, match="no merge recipe"):
        session.save("out")
    session.restore()
    assert torch.equal(live.tensors()[key], before)


def test_apply_stream_that_fails_leaves_the_model_as_it_was(folder):
    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    keys = [k for k in live.tensors() if k.endswith(".weight")][:2]
    before = {k: live.tensors()[k].clone() for k in keys}

    def failing(cancel):
        yield keys[0], before[keys[0]] * 0
        raise MergeError("lora.safetensors: broken")

    with pytest.raises(MergeError, match="broken"):
        session.apply_stream("bad", failing)
    assert all(torch.equal(live.tensors()[k], before[k]) for k in keys)


def _adding(keys, amount: float, kind: str = "lora"):
    """A layer adding ``amount`` to ``keys`` (a stand-in for the LoRA tab's)."""
    from mergers.stack import Layer

    return Layer(kind, f"+{amount}", frozenset(keys), lambda: contextlib.nullcontext(lambda key, value: value + amount),
                 {"SuperMerger LoRA": f"+{amount}"})


def test_a_layer_goes_on_top_of_the_merge_and_restore_takes_the_stack_back(folder, tmp_path):
    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    outcome = session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    merge_to_file(outcome.recipe, tmp_path / "ab.safetensors", resolve=session.host.resolve)
    keys = [k for k in live.tensors() if k.endswith("proj_in.weight")]
    layered = session.apply_layer(_adding(keys, 1.0))
    assert layered.stack == f"{outcome.name}, then LoRA +1.0" and layered.changed == len(keys)
    with open_checkpoint(tmp_path / "ab.safetensors") as merged:
        assert all(torch.equal(live.tensors()[k], merged[k] + 1.0 if k in keys else merged[k]) for k in merged)
    assert session.infotext()["SuperMerger LoRA"] == "+1.0" and session.infotext()["SuperMerger"] == layered.stack
    session.save("ab_saved")
    assert any("LoRA +1.0, swapped in on top of it, is not in it" in w for w in session.save_warnings)
    session.restore()
    assert session.state()["stack"] == [] and session.infotext() == {}
    with open_checkpoint(folder / "a.safetensors") as original:
        assert all(torch.equal(live.tensors()[k], original[k]) for k in original)


def test_a_layer_that_fails_puts_the_checkpoint_back_and_says_so(folder):
    from mergers.errors import NonFiniteError

    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    keys = [k for k in live.tensors() if k.endswith("proj_in.weight")]
    with pytest.raises(NonFiniteError, match="LoRA \\+inf: .*back to its checkpoint's own weights"):
        session.apply_layer(_adding(keys, float("inf")))
    assert session.state()["merged"] is False and session.current is None
    with open_checkpoint(folder / "a.safetensors") as original:
        assert all(torch.equal(live.tensors()[k], original[k]) for k in original)


def test_a_virtual_checkpoint_loads_into_the_model_and_restores(folder, tmp_path):
    from mergers.virtual import save_virtual_checkpoint

    live = FakeLive.load(folder / "a.safetensors")
    session = MergeSession(LiveFolderHost(folder, live))
    recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors", weights_alpha="GRAD_V")
    save_virtual_checkpoint(recipe, folder / "ab.recipe.json")
    assert "ab.recipe.json" in [entry.title for entry in session.host.list_models()]
    outcome = session.load_virtual("ab.recipe.json")
    assert outcome.swapped and outcome.recipe.weights_alpha == recipe.weights_alpha
    merge_to_file(recipe, tmp_path / "ref.safetensors", resolve=session.host.resolve)
    with open_checkpoint(tmp_path / "ref.safetensors") as ref:
        assert all(torch.equal(live.tensors()[k], ref[k]) for k in ref)
    session.restore()
    with open_checkpoint(folder / "a.safetensors") as original:
        assert all(torch.equal(live.tensors()[k], original[k]) for k in original)
    with pytest.raises(MergeError, match="not a saved recipe"):
        session.load_virtual("b.safetensors")
