"""Other tools' stored recipes (A1111, the original SuperMerger, sd-mecha), the estimate, and `run`."""

import json

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.errors import MergeError
from mergers.estimate import estimate
from mergers.interop import describe_stored_recipes, parent_tree, rerunnable_recipe
from mergers.merge import merge_to_file, open_sources
from mergers.models import find_model
from mergers.recipe import Recipe
from tests.ui_host import SD1_ABCD, write_models

SHA = {name: name * 64 for name in "abcdef"}


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def models(tmp_path):
    return write_models(tmp_path, SD1_ABCD)


def a1111_metadata(method="Add difference", **extra):
    inner = {"type": "webui", "primary_model_hash": SHA["d"], "secondary_model_hash": SHA["e"],
             "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.5}
    recipe = {"type": "webui", "primary_model_hash": SHA["a"], "secondary_model_hash": SHA["b"],
              "tertiary_model_hash": SHA["c"], "interp_method": method, "multiplier": 0.3,
              "save_as_half": True, "custom_name": "", "config_source": 0, "bake_in_vae": "None",
              "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False, **extra}
    models = {SHA["a"]: {"name": "a.safetensors", "legacy_hash": "aaaaaaaa", "sd_merge_recipe": json.dumps(inner)},
              SHA["b"]: {"name": "b.safetensors", "legacy_hash": "bbbbbbbb", "sd_merge_recipe": None},
              SHA["c"]: {"name": "c.safetensors", "legacy_hash": "cccccccc", "sd_merge_recipe": None},
              SHA["d"]: {"name": "d.safetensors", "legacy_hash": "dddddddd"},
              SHA["e"]: {"name": "e.safetensors", "legacy_hash": "eeeeeeee"}}
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def test_a1111_recipe_maps_and_shows_its_parent_tree():
    info = describe_stored_recipes(a1111_metadata())
    mapped = info["a1111"]
    assert mapped["runnable"] and mapped["cannot_map"] == []
    assert mapped["recipe"]["mode"] == "add_difference" and mapped["recipe"]["alpha"] == 0.3
    assert (mapped["recipe"]["model_a"], mapped["recipe"]["model_c"]) == ("a.safetensors", "c.safetensors")
    assert mapped["recipe"]["dtype"] == "fp16"
    tree = info["parents"]
    assert [node["name"] for node in tree] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert tree[0]["recipe"] == "Weighted sum of d.safetensors and e.safetensors, multiplier 0.5"
    assert [p["name"] for p in tree[0]["parents"]] == ["d.safetensors", "e.safetensors"]


def test_a1111_what_cannot_be_mapped_is_said():
    info = describe_stored_recipes(a1111_metadata("No interpolation", discard_weights="model_ema"))
    assert not info["a1111"]["runnable"] and info["a1111"]["recipe"] is None
    reasons = " ".join(info["a1111"]["cannot_map"])
    assert "No interpolation" in reasons and "discard_weights 'model_ema'" in reasons
    with pytest.raises(MergeError, match="no merge recipe that supermerger can re-run.*No interpolation"):
        rerunnable_recipe(a1111_metadata("No interpolation"), source="x.safetensors")


def test_parent_tree_survives_a_cycle():
    metadata = a1111_metadata()
    models = json.loads(metadata["sd_merge_models"])
    models[SHA["d"]]["sd_merge_recipe"] = metadata["sd_merge_recipe"]  # d claims to be made from a
    metadata["sd_merge_models"] = json.dumps(models)
    assert parent_tree(metadata)[0]["name"] == "a.safetensors"


def test_original_supermerger_recipe_maps_block_weights_and_exclude():
    raw = {"type": "sd-webui-supermerger", "weights_alpha": None, "weights_beta": None,
           "weights_alpha_orig": ",".join(["0.5"] * 26), "weights_beta_orig": None,
           "model_a": SHA["a"], "model_b": SHA["b"], "model_c": "", "base_alpha": 0.5, "base_beta": 0.2,
           "mode": "Weight sum", "mbw": True, "elemental_merge": ["OUT03:attn2:0.1"], "calcmode": "cosineA",
           "Exclude": ["IN01", "attn2"]}
    models = {SHA["a"]: {"name": "a.safetensors"}, SHA["b"]: {"name": "b.safetensors"}}
    metadata = {"sd_merge_recipe": json.dumps(raw), "sd_merge_models": json.dumps(models)}
    recipe, known = rerunnable_recipe(metadata)
    assert (recipe.model_a, recipe.model_b, recipe.calcmode) == ("a.safetensors", "b.safetensors", "cosineA")
    assert recipe.weights_alpha == raw["weights_alpha_orig"] and recipe.elemental == "OUT03:attn2:0.1"
    assert (recipe.include_exclude, recipe.include_exclude_blocks, recipe.include_exclude_elements) == \
        ("exclude", "IN01", "attn2")
    assert known["model_b"]["sha256"] == SHA["b"]


def test_sd_mecha_recipe_maps_weighted_sum_and_add_difference_as_a_chain():
    text = "\n".join([
        "version 0.1.0",
        'model "a.safetensors" model_config="sd1-ldm" merge_space="weight"',
        'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"',
        'merge "weighted_sum" &0 &1 alpha=0.25',
        'model "c.safetensors" model_config="sd1-ldm" merge_space="weight"',
        'model "d.safetensors" model_config="sd1-ldm" merge_space="weight"',
        'merge "subtract" &3 &4',
        'merge "add_difference" &2 &5 alpha=0.5',
    ])
    mapped = describe_stored_recipes({"mecha_recipe": text})["sd-mecha"]
    assert mapped["runnable"], mapped["cannot_map"]
    recipe = Recipe.from_dict(mapped["recipe"])
    assert recipe.model_a == Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.25)
    assert (recipe.mode, recipe.model_b, recipe.model_c, recipe.alpha) == \
        ("add_difference", "c.safetensors", "d.safetensors", 0.5)
    assert mapped["summary"].startswith("add_difference(weighted_sum(a.safetensors, b.safetensors, alpha=0.25)")


def test_sd_mecha_methods_without_a_counterpart_are_named():
    text = "version 0.1.0\nmodel \"a\"\nmodel \"b\"\ndict IN00=0.1 OUT00=0.2\nmerge \"ties_sum\" &0 &1 alpha=&2"
    mapped = describe_stored_recipes({"mecha_recipe": text})["sd-mecha"]
    assert not mapped["runnable"] and "method 'ties_sum' has no counterpart here" in mapped["cannot_map"]
    broken = describe_stored_recipes({"mecha_recipe": "merge nothing"})["sd-mecha"]
    assert "cannot read it" in broken["cannot_map"][0]


def test_our_own_files_rerun_from_the_a1111_keys_we_write_too(tmp_path, models):
    result = merge_to_file(Recipe(model_a=str(models[0]), model_b=str(models[1]), alpha=0.3),
                           tmp_path / "ab.safetensors")
    with open_checkpoint(result.path) as ckpt:
        info = describe_stored_recipes(ckpt.metadata)
        recipe, known = rerunnable_recipe(ckpt.metadata)
    assert info["supermerger"]["runnable"] and info["sd-webui-supermerger"]["runnable"]
    assert recipe.model_a == "a.safetensors"
    assert find_model(recipe.model_b, tmp_path, known) == models[1]


def test_estimate_counts_bytes_from_headers_and_chains(tmp_path, models):
    a, b, c, d = map(str, models)
    plain = Recipe(model_a=a, model_b=b)
    chained = Recipe(model_a=plain, model_b=c, model_c=d, mode="Add difference")
    size = sum(t.numel() * t.element_size() for t in tiny_state_dict("sd1", seed=1).values())
    with open_sources(plain) as sources:
        one = estimate(plain, sources, disk_bytes_per_s=1e6, device="cpu")
    with open_sources(chained) as sources:
        two = estimate(chained, sources, device="cpu")
    assert one.write_bytes == size and size < one.read_bytes <= 2 * size
    assert two.read_bytes > one.read_bytes + size  # C and D read too
    assert one.seconds == pytest.approx((one.read_bytes + one.write_bytes) / 1e6)
    assert one.peak_ram_bytes < 3 * size and one.peak_vram_bytes == 0
    assert two.peak_ram_bytes > one.peak_ram_bytes  # the chained key's inner working set adds on
    assert one.text().startswith("estimate: reads ")


def test_run_command_runs_a_chained_recipe_file(tmp_path, models, capsys):
    inner = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.25)
    chained = Recipe(model_a=inner, model_b="c.safetensors", model_c="d.safetensors", mode="Add difference")
    recipe_file = tmp_path / "chain.json"
    recipe_file.write_text(chained.to_json())
    out = tmp_path / "out.safetensors"
    assert main(["run", str(recipe_file), "--estimate"], command_modules=("mergers.run_cli",)) == 0
    assert "estimate: reads" in capsys.readouterr().out and not out.exists()
    assert main(["run", str(recipe_file), "-o", str(out), "--dtype", "fp32"],
                command_modules=("mergers.run_cli",)) == 0
    printed = capsys.readouterr().out
    assert "recipe: Add difference(Weight sum(a, b; α=0.25), c, d; α=0.5)" in printed and "wrote" in printed
    with open_checkpoint(out) as ckpt:
        assert ckpt.dtype("model.diffusion_model.out.2.weight") == torch.float32
    missing = tmp_path / "missing.json"
    missing.write_text(Recipe(model_a="nope.safetensors", model_b="b.safetensors").to_json())
    assert main(["run", str(missing), "-o", str(tmp_path / "x.safetensors")],
                command_modules=("mergers.run_cli",)) == 2
    assert "nope.safetensors" in capsys.readouterr().err
