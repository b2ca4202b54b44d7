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


# sd-mecha's recipes are made and merged by the real sd-mecha in tests/test_interop_mecha.py.


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


# Replaying as the source tool computed ------------------------------------------------------

def a1111_merge(paths, method: str, multiplier: float) -> dict:
    """What A1111 v1.10.1's run_modelmerger computes with save_as_half: B (− C) first, then each key
    of A that holds "model", that B has and that is not CLIP's position_ids, in the files' dtype:
    ``(1 − m)·A + m·B`` or ``A + m·(B − C)``, then ``.half()`` of fp32 results."""
    state = [{k: ckpt[k] for k in ckpt} for ckpt in map(open_checkpoint, paths)]
    a, b = state[0], dict(state[1])
    if method == "Add difference":
        b = {k: (t - state[2][k]) if "model" in k and k in state[2] else t for k, t in b.items()}
    for key in a:
        if "model" in key and key in b and not key.endswith("embeddings.position_ids"):
            merged = ((1 - multiplier) * a[key]) + (multiplier * b[key]) if method == "Weighted sum" \
                else a[key] + (multiplier * b[key])
            a[key] = merged.half() if merged.dtype == torch.float else merged
    return a


def a1111_file(tmp_path, paths, method="Weighted sum", multiplier=0.3):
    """A file as A1111 writes it: its arithmetic, and its sd_merge_recipe / sd_merge_models."""
    from mergers.writer import save_checkpoint

    hashes = [open_checkpoint(p).sha256() for p in paths]
    recipe = {"type": "webui", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1],
              "tertiary_model_hash": hashes[2] if method == "Add difference" else None, "interp_method": method,
              "multiplier": multiplier, "save_as_half": True, "custom_name": "", "config_source": 0,
              "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = {sha: {"name": p.name, "legacy_hash": "", "sd_merge_recipe": None} for sha, p in zip(hashes, paths)}
    out = tmp_path / f"a1111_{method.replace(' ', '_')}.safetensors"
    save_checkpoint(out, a1111_merge(paths, method, multiplier),
                    metadata={"format": "pt", "sd_merge_recipe": json.dumps(recipe),
                              "sd_merge_models": json.dumps(models)})
    return out


def _differing(first, second) -> list[str]:
    with open_checkpoint(first) as one, open_checkpoint(second) as two:
        assert sorted(one) == sorted(two)
        return [key for key in one if not torch.equal(one[key], two[key])]


@pytest.mark.parametrize("method", ["Weighted sum", "Add difference"])
def test_a1111_merges_replay_bit_for_bit_with_a1111s_arithmetic(tmp_path, models, method, capsys):
    theirs = a1111_file(tmp_path, models[:3], method)
    again = tmp_path / "again.safetensors"
    assert main(["recipe", str(theirs), "--models", str(models[0].parent), "-o", str(again)]) == 0
    assert "arithmetic: A1111's" in capsys.readouterr().out
    assert _differing(theirs, again) == []
    if method == "Weighted sum":  # our own lerp rounds once, A1111 three times: the arithmetic matters
        lerp = merge_to_file(Recipe(model_a=str(models[0]), model_b=str(models[1]), alpha=0.3),
                             tmp_path / "lerp.safetensors")
        assert len(_differing(theirs, lerp.path)) > 100


def test_info_says_a_replay_of_a1111_computes_as_a1111(tmp_path, models, capsys):
    assert main(["info", str(a1111_file(tmp_path, models[:2])), "--json"]) == 0
    mapped = json.loads(capsys.readouterr().out)["stored_recipes"]["a1111"]
    assert mapped["recipe"]["calcmode"] == "A1111" and mapped["arithmetic"].startswith("A1111's")
    assert any("bake_in_vae" in item for item in mapped["not_recorded"])


def _as_the_original_wrote_it(path, tmp_path):
    """``path`` (our merge) with only the original SuperMerger's keys: its recipe, without ours."""
    from mergers.writer import save_checkpoint

    with open_checkpoint(path) as ckpt:
        state = {k: ckpt[k] for k in ckpt}
        metadata = {k: v for k, v in ckpt.metadata.items() if k != "supermerger_recipe"}
    out = tmp_path / "original.safetensors"
    save_checkpoint(out, state, metadata=metadata)
    return out


def test_original_recipe_replay_says_what_it_could_not_know(tmp_path, models, capsys):
    adjusted = merge_to_file(Recipe(model_a=str(models[0]), model_b=str(models[1]), alpha=0.4, dtype="fp32",
                                    adjust="2,0,0,0,0,0,1,0"), tmp_path / "adjusted.safetensors")
    original = _as_the_original_wrote_it(adjusted.path, tmp_path)
    again = tmp_path / "again.safetensors"
    assert main(["recipe", str(original), "--models", str(models[0].parent), "-o", str(again)]) == 0
    printed = capsys.readouterr().out
    note = next(line for line in printed.splitlines() if line.startswith("note:"))
    assert all(word in note for word in ("may have been used", "Adjust", "bake-in VAE", "gamma", "prune"))
    with open_checkpoint(again) as ckpt:  # the precision the original does not record: read from the file
        assert ckpt.dtype("model.diffusion_model.out.2.weight") == torch.float32
    assert "model.diffusion_model.out.2.bias" in _differing(original, again)  # Adjust was in fact used
    assert main(["info", str(original), "--json"]) == 0
    mapped = json.loads(capsys.readouterr().out)["stored_recipes"]["sd-webui-supermerger"]
    assert any(item.startswith("Adjust") for item in mapped["not_recorded"]) and mapped["recipe"]["dtype"] == "fp32"


# Our own recipe is the reference: every kind of merge replays bit for bit --------------------

OWN_RECIPES = {
    "weight_sum": dict(alpha=0.3),
    "add_difference": dict(mode="add_difference", alpha=0.7),
    "triple_sum": dict(mode="triple_sum", alpha=0.3, beta=0.2),
    "sum_twice": dict(mode="sum_twice", alpha=0.3, beta=0.2),
    "cosineA": dict(calcmode="cosineA", alpha=0.4),
    "trainDifference": dict(mode="add_difference", calcmode="trainDifference"),
    "extract": dict(mode="add_difference", calcmode="extract", gamma=0.4),
    "plus_random": dict(calcmode="plus random", alpha=0.1),
    "ties": dict(mode="ties", alpha=0.8, beta=0.5),
    "dare": dict(mode="dare", alpha=0.8, beta=0.5),
    "a1111": dict(calcmode="A1111", alpha=0.3),
    "sd_mecha": dict(mode="slerp", calcmode="sd-mecha", alpha=0.3),
    "block_weights_elemental": dict(weights_alpha="GRAD_V", elemental="OUT03-OUT05:attn2:0.1"),
    "dice": dict(dice={"mode": "R", "seed": 5}),
    "include_adjust_fp32": dict(include_exclude="exclude", include_exclude_blocks="IN01 VAE",
                                adjust="2,0,0,0,0,0,1,0", dtype="fp32"),
}


@pytest.mark.parametrize("name", OWN_RECIPES)
def test_our_own_recipe_replays_bit_for_bit(tmp_path, models, name):
    a, b, c, d = map(str, models)
    recipe = Recipe.from_dict({"model_a": a, "model_b": b, "model_c": c, **OWN_RECIPES[name]})
    if name == "weight_sum":  # and a chained one
        recipe = Recipe(model_a=recipe, model_b=c, model_c=d, mode="add_difference", alpha=0.5)
    first = merge_to_file(recipe, tmp_path / "first.safetensors").path
    again = tmp_path / "again.safetensors"
    assert main(["recipe", str(first), "--models", str(models[0].parent), "-o", str(again)]) == 0
    assert _differing(first, again) == []


def test_a1111_weighted_sum_of_mixed_dtypes_is_within_its_stated_bound(tmp_path, models):
    """A fp32, B fp16: A1111 rounds α·B to fp16 before adding, our replay widens B first; the files then
    differ by at most half an fp16 unit of α·B (plus fp32 rounding), as a1111_weight_sum's docstring says."""
    from mergers.writer import save_checkpoint

    with open_checkpoint(models[0]) as ckpt:
        save_checkpoint(tmp_path / "a32.safetensors", {k: ckpt[k].float() if ckpt[k].is_floating_point() else ckpt[k]
                                                       for k in ckpt})
    paths = [tmp_path / "a32.safetensors", models[1]]
    theirs = a1111_file(tmp_path, paths)
    recipe = json.loads(open_checkpoint(theirs).metadata["sd_merge_recipe"])
    recipe["save_as_half"] = False  # keep fp32, where the two roundings can differ
    recipe_file = tmp_path / "mixed.safetensors"
    with open_checkpoint(theirs) as ckpt:
        state = {k: ckpt[k] for k in ckpt}
        metadata = {**ckpt.metadata, "sd_merge_recipe": json.dumps(recipe)}
    with open_checkpoint(paths[0]) as a, open_checkpoint(paths[1]) as b:  # A1111 without save_as_half
        for key in state:
            if "model" in key and key in b and a[key].is_floating_point():
                state[key] = (0.7 * a[key]) + (0.3 * b[key])
    save_checkpoint(recipe_file, state, metadata=metadata)
    again = tmp_path / "again.safetensors"
    assert main(["recipe", str(recipe_file), "--models", str(tmp_path), "-o", str(again)]) == 0
    with open_checkpoint(recipe_file) as one, open_checkpoint(again) as two, open_checkpoint(paths[1]) as b:
        for key in one:
            if one[key].is_floating_point() and key in b:
                bound = (0.3 * b[key].float()).abs() * 2.0 ** -11 + one[key].abs() * 2.0 ** -22 + 2.0 ** -25
                excess = (one[key] - two[key]).abs() - bound
                assert excess.max() <= 0, (key, excess.argmax(), one[key].flatten()[excess.argmax()],
                                           two[key].flatten()[excess.argmax()], b[key].flatten()[excess.argmax()])
