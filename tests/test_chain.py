"""Chained recipes and N models: a recipe's result as another recipe's input, in one pass.

The central check: a chained recipe gives the same tensors, byte for byte, as running its
steps one by one through files.
"""

import json

import pytest
import torch

from mergers.chain import RecipeCheckpoint, describe, leaf_names, load_recipe_file, open_model
from mergers.checkpoint import open_checkpoint
from mergers.errors import CheckpointError, RecipeError
from mergers.merge import merge_stream, merge_to_file, resolve_path
from mergers.metadata import stored_recipe
from mergers.methods import modes, registry
from mergers.models import find_model
from mergers.recipe import MAX_CHAIN_DEPTH, Recipe
from tests.ui_host import SD1_ABCD, write_models


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def models(tmp_path):
    return write_models(tmp_path, SD1_ABCD)


def tensors_of(path):
    with open_checkpoint(path) as ckpt:
        return {key: ckpt[key] for key in ckpt}


def assert_same_bytes(left, right):
    assert list(left) == list(right)
    for key in left:
        assert left[key].dtype == right[key].dtype and left[key].shape == right[key].shape, key
        assert torch.equal(left[key].view(torch.uint8), right[key].view(torch.uint8)), key


def test_chained_recipe_gives_the_bytes_of_its_steps_run_through_files(tmp_path, models):
    a, b, c, d = map(str, models)
    inner = Recipe(model_a=a, model_b=b, weights_alpha="GRAD_V")
    outer_of = lambda first: Recipe(model_a=first, model_b=c, model_c=d, mode="Add difference", alpha=0.7)  # noqa: E731

    step_file = merge_to_file(inner, tmp_path / "ab.safetensors").path
    by_steps = merge_to_file(outer_of(str(step_file)), tmp_path / "steps.safetensors").path
    chained = merge_to_file(outer_of(inner), tmp_path / "chained.safetensors").path

    assert_same_bytes(tensors_of(chained), tensors_of(by_steps))


def test_chain_in_slot_b_with_a_calcmode_and_output_dtype(tmp_path, models):
    a, b, c, _ = map(str, models)
    inner = Recipe(model_a=b, model_b=c, calcmode="cosineA", alpha=0.3, dtype="fp32")
    step_file = merge_to_file(inner, tmp_path / "bc.safetensors").path
    outer_of = lambda second: Recipe(model_a=a, model_b=second, alpha=0.4, dtype="bf16")  # noqa: E731
    by_steps = merge_to_file(outer_of(str(step_file)), tmp_path / "steps.safetensors").path
    chained = merge_to_file(outer_of(inner), tmp_path / "chained.safetensors").path
    assert_same_bytes(tensors_of(chained), tensors_of(by_steps))


def test_chained_file_records_the_whole_tree_and_reruns_from_a_folder(tmp_path, models):
    a, b, c, d = map(str, models)
    outer = Recipe(model_a=Recipe(model_a=a, model_b=b, alpha=0.25), model_b=c, model_c=d, mode="Add difference")
    first = merge_to_file(outer, tmp_path / "first.safetensors")
    with open_checkpoint(first.path) as ckpt:
        recipe, known = stored_recipe(ckpt.metadata)
    assert recipe.model_a == Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.25)
    assert known["model_a.model_b"]["name"] == "b.safetensors"
    assert known["model_a.model_a"]["sha256"] == open_checkpoint(models[0]).sha256()

    again = merge_to_file(recipe, tmp_path / "again.safetensors",
                          resolve=lambda name: find_model(name, tmp_path, known))
    assert_same_bytes(tensors_of(again.path), tensors_of(first.path))


def test_virtual_checkpoint_reads_like_a_file(tmp_path, models):
    a, b = str(models[0]), str(models[1])
    recipe = Recipe(model_a=a, model_b=b, alpha=0.3)
    merged = tensors_of(merge_to_file(recipe, tmp_path / "ab.safetensors").path)
    with open_model(recipe, resolve_path) as virtual:
        assert isinstance(virtual, RecipeCheckpoint)
        assert list(virtual) == list(merged)
        key = "model.diffusion_model.out.2.weight"
        assert virtual.shape(key) == tuple(merged[key].shape) and virtual.dtype(key) == merged[key].dtype
        assert torch.equal(virtual[key], merged[key])
        assert virtual.name == "Weight sum(a, b; α=0.3)"
        assert len(virtual.sha256()) == 64 and virtual.legacy_hash() == virtual.sha256()[:8]


def test_saved_recipe_file_is_a_model_and_its_names_resolve_beside_it(tmp_path, models):
    (tmp_path / "ab.recipe.json").write_text(
        Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3).to_json())
    by_file = merge_to_file(Recipe(model_a=str(models[0]), model_b=str(models[1]), alpha=0.3),
                            tmp_path / "ab.safetensors").path
    outer = Recipe(model_a=str(tmp_path / "ab.recipe.json"), model_b=str(models[2]), alpha=0.5)
    through_recipe = merge_to_file(outer, tmp_path / "x.safetensors").path
    direct = merge_to_file(outer.with_changes(model_a=str(by_file)), tmp_path / "y.safetensors").path
    assert_same_bytes(tensors_of(through_recipe), tensors_of(direct))


def test_recipe_files_that_refer_to_each_other_are_refused(tmp_path, models):
    (tmp_path / "x.recipe.json").write_text(Recipe(model_a="y.recipe.json", model_b="a.safetensors").to_json())
    (tmp_path / "y.recipe.json").write_text(Recipe(model_a="x.recipe.json", model_b="a.safetensors").to_json())
    with pytest.raises(RecipeError, match="loop"):
        merge_to_file(Recipe(model_a=str(tmp_path / "x.recipe.json"), model_b=str(models[1])),
                      tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_recipe_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.recipe.json"
    bad.write_text('{"model_a": "a"}')
    with pytest.raises(RecipeError, match="bad.recipe.json.*model_b"):
        load_recipe_file(bad)


def test_inner_error_stops_before_any_work(tmp_path, models):
    outer = Recipe(model_a=Recipe(model_a=str(models[0]), model_b=str(tmp_path / "missing.safetensors")),
                   model_b=str(models[1]))
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        merge_to_file(outer, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_nested_recipe_json_round_trips_and_plain_json_stays_version_1(models):
    plain = Recipe(model_a="a", model_b="b")
    assert plain.to_dict()["version"] == 1 and "more_models" not in plain.to_dict()
    chained = Recipe(model_a=plain, model_b="c", model_c="d", mode="Add difference")
    data = json.loads(chained.to_json())
    assert data["version"] == 2 and data["model_a"]["model_b"] == "b"
    assert Recipe.from_json(chained.to_json()) == chained
    assert leaf_names(chained) == ["a", "b", "c", "d"]
    assert describe(chained) == "Add difference(Weight sum(a, b; α=0.5), c, d; α=0.5)"


def test_hand_written_nested_json_and_its_errors():
    recipe = Recipe.from_dict({"model_a": {"model_a": "a", "model_b": "b", "alpha": 0.2}, "model_b": "c"})
    assert recipe.model_a.alpha == 0.2
    with pytest.raises(RecipeError, match="model_b must be a model name or a recipe"):
        Recipe.from_dict({"model_a": "a", "model_b": 3})
    with pytest.raises(RecipeError, match="missing model_b"):
        Recipe.from_dict({"model_a": {"model_a": "a"}, "model_b": "c"})
    deep: dict = {"model_a": "a", "model_b": "b"}
    for _ in range(MAX_CHAIN_DEPTH + 1):
        deep = {"model_a": deep, "model_b": "b"}
    with pytest.raises(RecipeError, match="nested more than"):
        Recipe.from_dict(deep)
    with pytest.raises(RecipeError, match="only for methods that take any number"):
        Recipe(model_a="a", model_b="b", more_models=("c",))


def test_merge_stream_of_a_chain_matches_the_file(tmp_path, models):
    a, b, c, d = map(str, models)
    outer = Recipe(model_a=Recipe(model_a=a, model_b=b), model_b=c, model_c=d, mode="Add difference")
    merged = tensors_of(merge_to_file(outer, tmp_path / "out.safetensors").path)
    streamed = dict(merge_stream(outer))
    assert_same_bytes(streamed, merged)


# N models --------------------------------------------------------------------------------

@pytest.fixture
def mean_of_models(monkeypatch):
    """A method over any number of models, registered for this test only (the real N-model
    methods come from mergers/methods/task.py)."""
    def model_mean(a, b, *others, alpha):
        return torch.lerp(a, torch.stack([a, b, *others]).mean(dim=0), alpha)

    method = registry.MergeMethod("test_mean", "Test mean", model_mean, 2, ("alpha",), "fp32", "mean")
    monkeypatch.setitem(registry.METHODS, "test_mean", method)
    monkeypatch.setitem(modes.MODES, "test_mean", "Test mean")
    monkeypatch.setitem(modes.METHOD_TABLE, ("test_mean", "normal"), "test_mean")
    return model_mean


def test_n_model_method_reads_every_model_and_records_them(tmp_path, models, mean_of_models):
    a, b, c, d = map(str, models)
    recipe = Recipe(model_a=a, model_b=b, model_c=c, more_models=(d,), mode="test_mean", alpha=1.0)
    assert recipe.models == (a, b, c, d)
    result = merge_to_file(recipe, tmp_path / "mean.safetensors")
    assert result.plan.input_count == 4
    inputs = [tensors_of(p) for p in models]
    merged = tensors_of(result.path)
    key = "model.diffusion_model.out.2.weight"
    expected = mean_of_models(*[m[key].float() for m in inputs], alpha=1.0).to(torch.float16)
    assert torch.equal(merged[key], expected)
    with open_checkpoint(result.path) as ckpt:
        stored, known = stored_recipe(ckpt.metadata)
    assert stored.more_models == ("d.safetensors",) and known["more_models[0]"]["name"] == "d.safetensors"


def test_n_model_method_takes_a_chained_model_d(tmp_path, models, mean_of_models):
    a, b, c, d = map(str, models)
    inner = Recipe(model_a=c, model_b=d, alpha=0.5)
    step = str(merge_to_file(inner, tmp_path / "cd.safetensors").path)
    recipe_of = lambda last: Recipe(model_a=a, model_b=b, more_models=(last,), mode="test_mean", alpha=0.5)  # noqa: E731
    by_steps = merge_to_file(recipe_of(step), tmp_path / "steps.safetensors").path
    chained = merge_to_file(recipe_of(inner), tmp_path / "chained.safetensors").path
    assert_same_bytes(tensors_of(chained), tensors_of(by_steps))
