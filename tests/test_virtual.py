"""Virtual checkpoints (saved recipes picked like checkpoints) and chaining by hand in the tab."""

import pytest
import torch

pytest.importorskip("gradio")

from mergers.checkpoint import open_checkpoint  # noqa: E402
from mergers.demo import tiny_state_dict  # noqa: E402
from mergers.errors import OutputError  # noqa: E402
from mergers.hosts.standalone import FolderHost  # noqa: E402
from mergers.merge import merge_to_file  # noqa: E402
from mergers.models import find_model  # noqa: E402
from mergers.recipe import Recipe  # noqa: E402
from mergers.session import MergeSession  # noqa: E402
from mergers.ui.fields import default_values  # noqa: E402
from mergers.ui.handlers import MESSAGE, TabActions  # noqa: E402
from mergers.virtual import save_virtual_checkpoint  # noqa: E402
from mergers.writer import save_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for seed, name in enumerate("abc", start=1):
        save_checkpoint(models / f"{name}.safetensors", tiny_state_dict("sd1", seed=seed))
    return models


def test_saved_recipe_is_listed_resolved_and_found_by_name(folder):
    save_virtual_checkpoint(Recipe(model_a="a.safetensors", model_b="b.safetensors"), folder / "ab.recipe.json")
    host = FolderHost(folder)
    titles = [entry.title for entry in host.list_models()]
    assert titles == ["a.safetensors", "b.safetensors", "c.safetensors", "ab.recipe.json"]
    assert host.resolve("ab.recipe.json") == folder / "ab.recipe.json"
    assert find_model("ab.recipe.json", folder) == folder / "ab.recipe.json"
    with pytest.raises(OutputError, match="exists"):
        save_virtual_checkpoint(Recipe(model_a="a", model_b="b"), folder / "ab.recipe.json")
    with pytest.raises(OutputError, match="ends in .recipe.json"):
        save_virtual_checkpoint(Recipe(model_a="a", model_b="b"), folder / "ab.json")


def test_tab_chains_by_hand_through_a_virtual_model_a(folder):
    actions = TabActions(MergeSession(FolderHost(folder)))
    values = {**default_values(), "model_a": "a.safetensors", "model_b": "b.safetensors", "alpha": 0.3}
    merged = actions.merge(values)
    assert "estimate: reads" in merged[MESSAGE]
    chained = actions.use_merge_as_model_a(values)
    title = chained["model_a"]["value"]
    assert title.endswith(".recipe.json") and title in chained["model_a"]["choices"]
    assert "model A is now the merge" in chained[MESSAGE]
    assert "Model A: SD1.x" in str(actions.change_model_a({**values, "model_a": title}))

    outer = actions.recipe({**values, "model_a": title, "model_b": "c.safetensors", "alpha": 0.5})
    through_virtual = merge_to_file(outer, folder / "x.safetensors", resolve=actions.host.resolve).path
    step = merge_to_file(Recipe(model_a=str(folder / "a.safetensors"), model_b=str(folder / "b.safetensors"),
                                alpha=0.3), folder / "ab.safetensors").path
    direct = merge_to_file(outer.with_changes(model_a=str(step), model_b=str(folder / "c.safetensors")),
                           folder / "y.safetensors").path
    with open_checkpoint(through_virtual) as left, open_checkpoint(direct) as right:
        assert all(torch.equal(left[key], right[key]) for key in left)


def test_use_merge_as_model_a_needs_a_merge(folder):
    actions = TabActions(MergeSession(FolderHost(folder)))
    assert "merge first" in actions.use_merge_as_model_a({})[MESSAGE]


def test_load_model_a_needs_a_saved_recipe(folder):
    actions = TabActions(MergeSession(FolderHost(folder)))
    assert "pick a saved recipe" in actions.load_model_a({"model_a": None})[MESSAGE]
    assert "not a saved recipe" in actions.load_model_a({"model_a": "a.safetensors"})[MESSAGE]
