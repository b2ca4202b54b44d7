"""Elemental, include/exclude, adjust and the dice inside whole merges, key by key."""

import json

import pytest
import torch

from mergers.arch import block_ids, block_of
from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.dice import Dice, roll
from mergers.errors import WeightsError
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.weights import parse_weights
from mergers.writer import save_checkpoint


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


def _models(folder, family):
    paths = []
    for seed in (1, 2):
        path = folder / f"{family}_{seed}.safetensors"
        save_checkpoint(path, tiny_state_dict(family, seed=seed, dtype=torch.float32))
        paths.append(path)
    return paths


def _load(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k] for k in ckpt}


def _ratio_of(out, a, b, key):
    """The alpha a weight-sum merge used for ``key`` (exact for lerp on distinct fp32 tensors)."""
    if torch.equal(out[key], a[key]):
        return 0.0
    diff = b[key] - a[key]
    i = diff.abs().argmax()
    return float((out[key].flatten()[i] - a[key].flatten()[i]) / diff.flatten()[i])


def _merged_keys(state, layout):
    return [k for k in state if "model" in k and ("weight" in k or "bias" in k) and block_of(k, layout)]


@pytest.mark.parametrize("family, layout", [("sd1", "sd1"), ("sdxl", "sdxl")])
def test_elemental_overrides_block_weights_key_by_key(tmp_path, family, layout):
    a, b = _models(tmp_path, family)
    recipe = Recipe(model_a=str(a), model_b=str(b), weights_alpha="ALL:0.25",
                    elemental="M00:attn2:0.75\nOUT00-OUT02:NOT norm:1")
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa, sb = (_load(p) for p in (tmp_path / "out.safetensors", a, b))
    hits = 0
    for key in _merged_keys(sa, layout):
        block = block_of(key, layout)
        expected = 0.25
        if block == "M00" and "attn2" in key:
            expected = 0.75
        if block in ("OUT00", "OUT01", "OUT02") and "norm" not in key:
            expected = 1.0
        hits += expected != 0.25
        assert _ratio_of(out, sa, sb, key) == pytest.approx(expected, abs=1e-5), key
    assert hits > 10


def test_sdxl_elemental_names_the_real_middle_block(tmp_path):
    """The original shifts SDXL names from M00 on (issue #468); here M00 is the middle block."""
    a, b = _models(tmp_path, "sdxl")
    merge_to_file(Recipe(model_a=str(a), model_b=str(b), alpha=0.0, elemental="M00::1"), tmp_path / "o.safetensors")
    out, sa, sb = (_load(p) for p in (tmp_path / "o.safetensors", a, b))
    for key in _merged_keys(sa, "sdxl"):
        expected = 1.0 if "middle_block" in key else 0.0
        assert _ratio_of(out, sa, sb, key) == pytest.approx(expected, abs=1e-5), key


@pytest.mark.parametrize("mode", ["include", "exclude"])
def test_include_exclude_keep_keys_as_a(tmp_path, mode):
    a, b = _models(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), alpha=1.0, include_exclude=mode,
                    include_exclude_blocks="IN01 VAE", include_exclude_elements="attn2")
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa, sb = (_load(p) for p in (tmp_path / "out.safetensors", a, b))
    for key in _merged_keys(sa, "sd1"):
        chosen = block_of(key, "sd1") == "IN01" or key.startswith("first_stage_model") or "attn2" in key
        takes_b = chosen if mode == "include" else not chosen
        assert torch.equal(out[key], sb[key] if takes_b else sa[key]), key
    recorded = json.loads(result.metadata["sd_merge_recipe"])
    assert recorded[mode.capitalize()] == ["IN01", "VAE", "attn2"]


def test_excluded_blocks_read_zero_in_the_recorded_weights(tmp_path):
    a, b = _models(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), weights_alpha="ALL:1", include_exclude="exclude",
                    include_exclude_blocks="OUT05")
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    recorded = json.loads(result.metadata["sd_merge_recipe"])["weights_alpha_orig"].split(",")
    assert recorded[block_ids("sd1").index("OUT05")] == "0" and recorded.count("0") == 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_adjust_changes_exactly_its_six_keys_after_merging(tmp_path, family):
    a, b = _models(tmp_path, family)
    plain = merge_to_file(Recipe(model_a=str(a), model_b=str(b), alpha=0.5), tmp_path / "plain.safetensors")
    merge_to_file(Recipe(model_a=str(a), model_b=str(b), alpha=0.5, adjust="2,1,-1,1,1,0,0,0"),
                  tmp_path / "adjusted.safetensors")
    base, adjusted = _load(plain.path), _load(tmp_path / "adjusted.safetensors")
    changed = sorted(k for k in base if not torch.equal(base[k], adjusted[k]))
    prefix = "model.diffusion_model."
    assert changed == sorted(prefix + k for k in ("input_blocks.0.0.weight", "input_blocks.0.0.bias",
                                                  "out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"))
    assert torch.allclose(adjusted[prefix + "input_blocks.0.0.weight"], base[prefix + "input_blocks.0.0.weight"] * 0.98)
    assert torch.allclose(adjusted[prefix + "out.2.weight"], base[prefix + "out.2.weight"] * 1.01)
    shift = adjusted[prefix + "out.2.bias"] - base[prefix + "out.2.bias"]
    expected = [0.02, -0.02, 0.02 / 3, 0.04 / 3] if family == "sd1" else [0.02, 0.0, 0.0, 0.02]
    assert torch.allclose(shift, torch.tensor(expected), atol=1e-6)


def test_dice_weights_are_drawn_recorded_and_replay_without_the_dice(tmp_path):
    a, b = _models(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), dice=Dice(mode="R", seed=1234))
    result = merge_to_file(recipe, tmp_path / "dice.safetensors")
    drawn = result.plan.recipe
    assert drawn.dice.mode == "off" and drawn.dice.seed == 1234
    assert drawn.weights_alpha == roll(Dice(mode="R", seed=1234), "sd1").weights_alpha
    assert drawn.weights_alpha.split(",")[1:3] == ["0.622", "0.438"]  # seed 1234's draws, as the original's
    weights = parse_weights(drawn.weights_alpha, "sd1")
    out, sa, sb = (_load(p) for p in (result.path, a, b))
    key = "model.diffusion_model.output_blocks.4.1.proj_out.weight"
    assert _ratio_of(out, sa, sb, key) == pytest.approx(weights.value_of("OUT04"), abs=1e-5)
    replay = merge_to_file(drawn, tmp_path / "replay.safetensors")
    assert replay.plan.recipe == drawn
    again = _load(tmp_path / "replay.safetensors")
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_element_level_dice_gives_each_key_its_own_ratio_and_replays(tmp_path):
    a, b = _models(tmp_path, "sd1")
    first = merge_to_file(Recipe(model_a=str(a), model_b=str(b), dice=Dice(mode="ER", seed=5)), tmp_path / "1.safetensors")
    assert first.plan.recipe.elemental and "::R" in first.plan.recipe.elemental
    out, sa, sb = (_load(p) for p in (first.path, a, b))
    ratios = {round(_ratio_of(out, sa, sb, k), 3) for k in _merged_keys(sa, "sd1") if block_of(k, "sd1") == "OUT03"}
    assert len(ratios) > 5  # one draw per key, not per block
    merge_to_file(first.plan.recipe, tmp_path / "2.safetensors")
    again = _load(tmp_path / "2.safetensors")
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_bad_key_options_are_refused_before_any_work(tmp_path):
    a, b = _models(tmp_path, "sdxl")
    for options, message in [({"elemental": "IN10:attn:0.5"}, "IN10"), ({"adjust": "1,x"}, "x"),
                             ({"include_exclude": "exclude", "include_exclude_blocks": "IN99"}, "IN99")]:
        with pytest.raises(WeightsError, match=message):
            merge_to_file(Recipe(model_a=str(a), model_b=str(b), **options), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_carries_every_key_option(tmp_path, capsys):
    a, b = _models(tmp_path, "sd1")
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(a), str(b), "--elemental", "IN01::0.9", "--exclude", "VAE", "--adjust", "1,0,0,0,0,0,0,0",
                 "--dice", "U", "--dice-seed", "7", "-o", str(out)]) == 0
    with open_checkpoint(out) as merged:
        stored = json.loads(merged.metadata["supermerger_recipe"])["recipe"]
    assert stored["elemental"] == "IN01::0.9" and stored["include_exclude"] == "exclude"
    assert stored["adjust"] == "1,0,0,0,0,0,0,0" and stored["dice"]["seed"] == 7 and stored["dice"]["mode"] == "off"
    assert stored["weights_alpha"] == roll(Dice(mode="U", seed=7), "sd1").weights_alpha
