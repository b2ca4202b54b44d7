"""End-to-end merges on small checkpoints with the real SD key names.

Expected values are computed here the way the original SuperMerger's
``smerge`` computes them (its code path, restated), so these tests pin our
numbers to its numbers, key by key.
"""

import json
import threading

import pytest
import torch
from platforms import assert_lerp_equal

from mergers.arch import block_ids, block_of
from mergers.checkpoint import open_checkpoint
from mergers.demo import tiny_state_dict
from mergers.engine import run_plan
from mergers.errors import ArchitectureError, MergeCancelled, NonFiniteError, OutputError, WeightsError
from mergers.merge import merge_stream, merge_to_file, open_sources
from mergers.metadata import stored_recipe
from mergers.plan import plan_merge
from mergers.recipe import Recipe
from mergers.weights import parse_weights
from mergers.writer import save_checkpoint


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


def write_models(folder, family="sd1", dtype=torch.float16, seeds=(1, 2, 3), **options):
    paths = []
    for seed in seeds:
        path = folder / f"{family}_{seed}.safetensors"
        save_checkpoint(path, tiny_state_dict(family, seed=seed, dtype=dtype, **options))
        paths.append(path)
    return paths


def load(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k] for k in ckpt}


def original_merge(mode, a, b, c, alpha, beta):
    """One key as the original's 'normal' calcmode computes it (uselerp on, use32 off)."""
    if mode == "weight_sum":
        if alpha == 1:
            return b
        if alpha == 0:
            return a
        return torch.lerp(a.float(), b.float(), alpha).to(a.dtype)
    if mode == "add_difference":
        d = (b.float() - c.float()).to(b.dtype)
        return a + alpha * d
    if mode == "triple_sum":
        if alpha + beta == 0:
            return a
        return torch.lerp(a, torch.lerp(b, c, beta / (alpha + beta)), alpha + beta)
    return torch.lerp(torch.lerp(a.float(), b.float(), alpha), c.float(), beta).to(a.dtype)


def merged_by_original_rule(key):
    return "model" in key and ("weight" in key or "bias" in key)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("mode", ["weight_sum", "add_difference", "triple_sum", "sum_twice"])
def test_scalar_merge_matches_the_original_key_by_key(tmp_path, family, mode):
    a, b, c = write_models(tmp_path, family)
    recipe = Recipe(model_a=str(a), model_b=str(b), model_c=str(c), mode=mode, alpha=0.3, beta=0.45)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa, sb, sc = (load(p) for p in (tmp_path / "out.safetensors", a, b, c))
    assert list(out) == list(sa)
    layout = "sdxl" if family == "sdxl" else "sd1"
    for key in sa:
        if merged_by_original_rule(key) and block_of(key, layout) is not None:
            expected = original_merge(mode, sa[key], sb[key], sc[key], 0.3, 0.45)
        else:
            expected = sa[key]
        assert out[key].dtype == sa[key].dtype, key
        assert_lerp_equal(out[key], expected, key)


@pytest.mark.parametrize("family, layout", [("sd1", "sd1"), ("sdxl", "sdxl")])
def test_block_weights_decide_every_key(tmp_path, family, layout):
    a, b, _ = write_models(tmp_path, family)
    weights = ",".join(str(i / 100) for i in range(len(block_ids(layout))))
    recipe = Recipe(model_a=str(a), model_b=str(b), weights_alpha=weights, alpha=0.99)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa, sb = load(tmp_path / "out.safetensors"), load(a), load(b)
    for key in sa:
        block = block_of(key, layout)
        if merged_by_original_rule(key) and block is not None:
            ratio = block_ids(layout).index(block) / 100  # BASE is the first value, not the scalar
            assert torch.equal(out[key], original_merge("weight_sum", sa[key], sb[key], None, ratio, 0)), key
        else:
            assert torch.equal(out[key], sa[key]), key


def test_sdxl_given_26_values_uses_the_original_conversion(tmp_path):
    a, b, _ = write_models(tmp_path, "sdxl")
    merge_to_file(Recipe(model_a=str(a), model_b=str(b), weights_alpha="GRAD_V"), tmp_path / "out.safetensors")
    converted = parse_weights("GRAD_V", "sdxl")
    out, sa, sb = load(tmp_path / "out.safetensors"), load(a), load(b)
    key = "model.diffusion_model.output_blocks.8.0.skip_connection.weight"
    expected = original_merge("weight_sum", sa[key], sb[key], None, converted.value_of("OUT08"), 0)
    assert torch.equal(out[key], expected)
    # OUT08 of SDXL takes the value the 26-value list gives OUT08 (GRAD_V's 0.75)
    assert converted.value_of("OUT08") == pytest.approx(0.75)


@pytest.mark.parametrize("mode", ["weight_sum", "add_difference", "sum_twice"])
def test_properties(tmp_path, mode):
    a, b, _ = write_models(tmp_path, "sd1", dtype=torch.float32)
    c = b if mode == "add_difference" else a
    recipe = Recipe(model_a=str(a), model_b=str(b), model_c=str(c), mode=mode, alpha=0.0 if mode != "add_difference" else 0.8, beta=0.0)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa = load(tmp_path / "out.safetensors"), load(a)
    assert all(torch.equal(out[k], sa[k]) for k in sa)  # alpha 0 → A; B == C → A


def test_alpha_one_gives_b_for_merged_keys(tmp_path):
    a, b, _ = write_models(tmp_path, "sd1", dtype=torch.float32)
    merge_to_file(Recipe(model_a=str(a), model_b=str(b), alpha=1.0), tmp_path / "out.safetensors")
    out, sa, sb = load(tmp_path / "out.safetensors"), load(a), load(b)
    for key in sa:
        expected = sb[key] if merged_by_original_rule(key) else sa[key]
        assert torch.equal(out[key], expected), key


def test_position_ids_stay_as_a_and_reset_clip_repairs_them(tmp_path):
    state = tiny_state_dict("sd1", seed=1, optional=True)
    ids_key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[ids_key] = state[ids_key].clone()
    state[ids_key][0, 5] = 4  # a broken id, as some merges left them
    save_checkpoint(tmp_path / "a.safetensors", state)
    save_checkpoint(tmp_path / "b.safetensors", tiny_state_dict("sd1", seed=2, optional=True))
    recipe = Recipe(model_a=str(tmp_path / "a.safetensors"), model_b=str(tmp_path / "b.safetensors"), alpha=0.5)
    merge_to_file(recipe, tmp_path / "kept.safetensors")
    assert torch.equal(load(tmp_path / "kept.safetensors")[ids_key], state[ids_key])
    merge_to_file(recipe.with_changes(reset_clip=True), tmp_path / "reset.safetensors")
    assert torch.equal(load(tmp_path / "reset.safetensors")[ids_key], torch.arange(77).reshape(1, 77))


def test_keys_missing_in_b_or_c_stay_as_a_and_b_only_keys_are_copied(tmp_path):
    sa = tiny_state_dict("sd1", seed=1, dtype=torch.float32)
    sb = tiny_state_dict("sd1", seed=2, dtype=torch.float32)
    sc = tiny_state_dict("sd1", seed=3, dtype=torch.float32)
    only_a, only_c_missing = "model.diffusion_model.out.2.bias", "model.diffusion_model.out.0.weight"
    del sb[only_a]
    del sc[only_c_missing]
    sb["model.diffusion_model.extra.weight"] = torch.ones(3)
    for name, state in (("a", sa), ("b", sb), ("c", sc)):
        save_checkpoint(tmp_path / f"{name}.safetensors", state)
    recipe = Recipe(model_a=str(tmp_path / "a.safetensors"), model_b=str(tmp_path / "b.safetensors"),
                    model_c=str(tmp_path / "c.safetensors"), mode="Add difference", alpha=1.0)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out = load(tmp_path / "out.safetensors")
    assert torch.equal(out[only_a], sa[only_a]) and torch.equal(out[only_c_missing], sa[only_c_missing])
    assert torch.equal(out["model.diffusion_model.extra.weight"], torch.ones(3))
    key = "model.diffusion_model.out.2.weight"
    assert torch.allclose(out[key], sa[key] + (sb[key] - sc[key]))


@pytest.mark.parametrize("channels, suffix", [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_inpainting_a_merges_its_first_four_channels(tmp_path, channels, suffix):
    save_checkpoint(tmp_path / "a.safetensors", tiny_state_dict("sd1", seed=1, in_channels=channels))
    save_checkpoint(tmp_path / "b.safetensors", tiny_state_dict("sd1", seed=2))
    recipe = Recipe(model_a=str(tmp_path / "a.safetensors"), model_b=str(tmp_path / "b.safetensors"), alpha=0.5)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out, sa, sb = load(tmp_path / "out.safetensors")[key], load(tmp_path / "a.safetensors")[key], load(tmp_path / "b.safetensors")[key]
    assert out.shape[1] == channels
    assert torch.equal(out[:, :4], torch.lerp(sa[:, :4].float(), sb.float(), 0.5).half())
    assert torch.equal(out[:, 4:], sa[:, 4:])
    with pytest.raises(ArchitectureError, match=f"model A must be the {suffix} model"):
        merge_to_file(recipe.with_changes(model_a=recipe.model_b, model_b=recipe.model_a), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_different_architectures_are_refused_before_any_work(tmp_path):
    (a,) = write_models(tmp_path, "sd1", seeds=(1,))
    (b,) = write_models(tmp_path, "sdxl", seeds=(2,))
    with pytest.raises(ArchitectureError, match="same architecture"):
        merge_to_file(Recipe(model_a=str(a), model_b=str(b)), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_weight_count_names_the_layout(tmp_path):
    a, b, _ = write_models(tmp_path, "sdxl")
    with pytest.raises(WeightsError, match="20"):
        merge_to_file(Recipe(model_a=str(a), model_b=str(b), weights_alpha="0.5,0.5,0.5"), tmp_path / "o.safetensors")


def test_output_dtype_prune_and_metadata(tmp_path):
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"m{seed}.safetensors"
        save_checkpoint(path, tiny_state_dict("sd1", seed=seed, dtype=torch.float32, optional=True))
        paths.append(path)
    recipe = Recipe(model_a=str(paths[0]), model_b=str(paths[1]), weights_alpha="FLAT_25", dtype="bf16", prune=True)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    with open_checkpoint(tmp_path / "out.safetensors") as out, open_checkpoint(paths[0]) as a:
        assert not [k for k in out if k.startswith("model_ema") or k == "betas"]
        assert {out.dtype(k) for k in out if out.dtype(k).is_floating_point} == {torch.bfloat16}
        stored, models = stored_recipe(out.metadata)
        assert stored.weights_alpha == "FLAT_25" and stored.model_a == "m1.safetensors"
        assert models["model_a"]["sha256"] == a.sha256()
        theirs = json.loads(out.metadata["sd_merge_recipe"])
        assert theirs["type"] == "sd-webui-supermerger" and theirs["mode"] == "Weight sum" and theirs["mbw"]
        assert theirs["weights_alpha"] == [0.25] * 25 and theirs["model_a"] == a.sha256()
        assert set(json.loads(out.metadata["sd_merge_models"])) == {a.sha256(), models["model_b"]["sha256"]}


def test_bake_vae_replaces_first_stage_model(tmp_path):
    a, b, _ = write_models(tmp_path, "sd1")
    vae = {k[len("first_stage_model."):]: torch.full_like(v, 0.5) for k, v in load(a).items() if k.startswith("first_stage_model.")}
    save_checkpoint(tmp_path / "vae.safetensors", vae)
    recipe = Recipe(model_a=str(a), model_b=str(b), bake_vae=str(tmp_path / "vae.safetensors"))
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out = load(tmp_path / "out.safetensors")
    assert all(torch.equal(out["first_stage_model." + k], v) for k, v in vae.items())


def test_output_never_replaces_an_input(tmp_path):
    a, b, _ = write_models(tmp_path, "sd1")
    before = a.read_bytes()
    with pytest.raises(OutputError, match="input"):
        merge_to_file(Recipe(model_a=str(a), model_b=str(b)), a, overwrite=True)
    assert a.read_bytes() == before


def test_cancel_stops_and_leaves_nothing(tmp_path):
    a, b, _ = write_models(tmp_path, "sd1")
    cancel = threading.Event()
    seen = []

    def progress(done, total, key):
        seen.append(done)
        if done == 10:
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge_to_file(Recipe(model_a=str(a), model_b=str(b)), tmp_path / "out.safetensors", on_progress=progress, cancel=cancel)
    assert max(seen) == 10 and not (tmp_path / "out.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == sorted([a.name, b.name, "sd1_3.safetensors"])


def test_stream_holds_a_bounded_number_of_tensors(tmp_path):
    """The reader stays a budget ahead of the consumer: with a tiny budget, one step at a time."""
    a, b, _ = write_models(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b))
    with open_sources(recipe) as sources:
        plan = plan_merge(recipe, sources)
        stream = run_plan(plan, sources, readahead_bytes=1)
        first = next(stream)
        assert first[0] == plan.steps[0].key
        assert len(list(stream)) == len(plan.steps) - 1


def test_merge_stream_yields_what_the_file_holds(tmp_path):
    a, b, _ = write_models(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), alpha=0.7)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    saved = load(tmp_path / "out.safetensors")
    streamed = dict(merge_stream(recipe))
    assert streamed.keys() == saved.keys() and all(torch.equal(streamed[k], saved[k]) for k in saved)


def test_recipe_round_trips_and_validates():
    recipe = Recipe(model_a="a", model_b="b", model_c="c", mode="Triple sum", alpha=0.1, beta=0.2, weights_alpha="GRAD_V")
    assert Recipe.from_json(recipe.to_json()) == recipe and recipe.mode == "triple_sum"
    with pytest.raises(Exception, match="needs model C"):
        Recipe(model_a="a", model_b="b", mode="Add difference")
    with pytest.raises(Exception, match="finite"):
        Recipe(model_a="a", model_b="b", alpha=float("nan"))
    with pytest.raises(Exception, match="unknown recipe field"):
        Recipe.from_dict({"model_a": "a", "model_b": "b", "alhpa": 1})
    with pytest.raises(Exception, match="newer"):
        Recipe.from_dict({"model_a": "a", "model_b": "b", "version": 99})
    with pytest.raises(Exception, match="dtype"):
        Recipe(model_a="a", model_b="b", dtype="fp8")


def test_input_hashes_come_from_the_merges_own_reads(tmp_path, monkeypatch):
    """First merge of new files: no separate hashing pass, yet the metadata holds the true sha256."""
    import hashlib

    import mergers.hashing as hashing

    a, b, _ = write_models(tmp_path, "sd1")
    monkeypatch.setattr(hashing, "_hash_whole_file", lambda path: pytest.fail(f"{path} hashed in a second pass"))
    result = merge_to_file(Recipe(model_a=str(a), model_b=str(b), alpha=0.4), tmp_path / "out.safetensors")
    truth = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    with open_checkpoint(result.path) as out:
        _, models = stored_recipe(out.metadata)
        assert {m["name"]: m["sha256"] for m in models.values()} == truth
        assert set(json.loads(out.metadata["sd_merge_models"])) == set(truth.values())
        assert json.loads(out.metadata["sd_merge_recipe"])["model_a"] == truth[a.name]
    assert hashing.cached_sha256(a) == truth[a.name]  # and cached for next time


def test_pruned_keys_are_still_hashed(tmp_path):
    import hashlib

    state = tiny_state_dict("sd1", seed=1, dtype=torch.float32, optional=True)
    save_checkpoint(tmp_path / "a.safetensors", state)
    save_checkpoint(tmp_path / "b.safetensors", {k: v for k, v in reversed(list(state.items()))})  # other order
    recipe = Recipe(model_a=str(tmp_path / "a.safetensors"), model_b=str(tmp_path / "b.safetensors"), prune=True)
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    _, models = stored_recipe(result.metadata)
    for role in ("model_a", "model_b"):
        path = tmp_path / models[role]["name"]
        assert models[role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_in_an_input_is_reported_naming_the_key_and_model(tmp_path, caplog):
    sa = tiny_state_dict("sd1", seed=1, dtype=torch.float16)
    sb = tiny_state_dict("sd1", seed=2, dtype=torch.float16)
    key = "model.diffusion_model.out.2.weight"
    sb[key] = sb[key].clone()
    sb[key].view(-1)[3] = float("nan")
    save_checkpoint(tmp_path / "a.safetensors", sa)
    save_checkpoint(tmp_path / "b.safetensors", sb)
    recipe = Recipe(model_a=str(tmp_path / "a.safetensors"), model_b=str(tmp_path / "b.safetensors"), alpha=0.5)
    message = f"{key!r}: merged result is not finite (NaN; Weight sum: model B holds NaN/Inf there)"
    with pytest.raises(NonFiniteError) as refused:  # a save refuses NaN unless told to write it
        merge_to_file(recipe, tmp_path / "out.safetensors")
    assert str(refused.value) == message and refused.value.key == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no file, no temp
    result = merge_to_file(recipe, tmp_path / "out.safetensors", allow_non_finite=True)
    assert result.warnings == (message,)
    assert key in caplog.text


def test_a_formulas_nan_names_the_method_and_formula(tmp_path):
    """Finite inputs, non-finite result: the message blames the method's formula, not a model."""
    from mergers.engine import non_finite_message
    from mergers.methods import method_for

    plan = type("Plan", (), {"method": method_for("Weight sum", "cosineA")})()
    inputs = [torch.ones(3), torch.ones(3)]
    text = non_finite_message(plan, "k", inputs, torch.tensor([1.0, float("nan"), float("inf")]))
    assert text.startswith("'k': merged result is not finite (NaN and Inf; cosineA: its formula lerp(B, A, k)")
    text = non_finite_message(plan, "k", inputs, torch.tensor([1.0, float("inf")], dtype=torch.float16))
    assert "passes the range of float16" in text


def test_is_finite_is_exact_even_when_a_sum_overflows():
    from mergers.engine import is_finite

    big = torch.full((10_000,), 60000.0, dtype=torch.float16)  # finite, but the sum overflows fp16
    assert is_finite(big) and is_finite(torch.zeros(0)) and is_finite(torch.arange(3))
    assert not is_finite(torch.tensor([1.0, float("inf")])) and not is_finite(torch.tensor([float("nan")]))



def test_prune_keeps_the_sdxl_refiners_text_encoder():
    """The refiner merges with SD1's 26 blocks, but its text encoder lives under "conditioner."."""
    from mergers.arch import Architecture
    from mergers.plan import _kept_by_prune

    refiner = Architecture("sdxl_refiner")
    assert _kept_by_prune("conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight", refiner)
    assert _kept_by_prune("model.diffusion_model.out.2.weight", refiner)
    assert not _kept_by_prune("model_ema.decay", refiner)
