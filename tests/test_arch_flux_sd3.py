"""Flux and SD3: detection, block assignment of every real key, block weights, fp8 merges, and the
planning of a full-size (12-billion-parameter) Flux merge from headers alone."""

import json
import os
import struct

import pytest
import torch

from mergers.arch import block_ids, block_of, detect_architecture, key_specs, merges_by_name, require_supported
from mergers.checkpoint import dtype_name, open_checkpoint
from mergers.errors import WeightsError
from mergers.merge import merge_to_file, open_sources
from mergers.methods.basic import sum_twice
from mergers.plan import plan_merge
from mergers.recipe import Recipe
from mergers.weights import parse_weights
from mergers.writer import save_checkpoint
from platforms import assert_lerp_equal

DIFFUSION = "model.diffusion_model."
FLUX_INPUTS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in")
SD3_INPUTS = ("x_embedder", "context_embedder", "t_embedder", "y_embedder", "pos_embed")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


# Block assignment, key by key ---------------------------------------------------------------------

def expected_flux_block(component: str, key: str):
    """Restated from the key's parts: the component column, then the diffusion module and number."""
    if component == "vae":
        return None
    if component in ("clip_l", "t5xxl"):
        return "CLIP" if component == "clip_l" else "T5"
    module, number = key.removeprefix(DIFFUSION).split(".")[:2]
    return {"double_blocks": f"D{int(number):02d}" if module == "double_blocks" else None,
            "single_blocks": f"S{int(number):02d}" if module == "single_blocks" else None,
            "final_layer": "OUT"}.get(module, "IN" if module in FLUX_INPUTS else "unexpected")


def expected_sd3_block(component: str, key: str):
    if component == "vae" or key.startswith("model.model_sampling."):
        return None
    if component in ("clip_l", "clip_g", "t5xxl"):
        return "T5" if component == "t5xxl" else "CLIP"
    module, number = (key.removeprefix(DIFFUSION).split(".") + [""])[:2]
    if module == "joint_blocks":
        return f"J{int(number):02d}"
    return "OUT" if module == "final_layer" else "IN" if module in SD3_INPUTS else "unexpected"


def test_every_flux_key_gets_its_block_prefixed_and_bare():
    specs = key_specs("flux")
    for spec in specs:
        expected = expected_flux_block(spec.component, spec.key)
        assert block_of(spec.key, "flux") == expected, spec.key
        for alias in spec.aliases:  # the transformer alone, as BFL ship it: "double_blocks.0…"
            assert block_of(alias, "flux") == expected, alias
    per_block = [sum(block_of(s.key, "flux") == block for s in specs) for block in block_ids("flux")]
    assert len(block_ids("flux")) == 61 and all(per_block)
    assert set(per_block[3:22]) == {24} and set(per_block[22:60]) == {8}  # 19 double, 38 single blocks


def test_every_sd3_key_gets_its_block():
    specs = key_specs("sd3")
    for spec in specs:
        assert block_of(spec.key, "sd3") == expected_sd3_block(spec.component, spec.key), spec.key
    assert all(any(block_of(s.key, "sd3") == block for s in specs) for block in block_ids("sd3"))


def test_sd35_large_joint_blocks_past_23():
    key = DIFFUSION + "joint_blocks.30.x_block.attn.qkv.weight"
    assert (block_of(key, "sd3_large"), block_of(key, "sd3")) == ("J30", None)
    assert len(block_ids("sd3")) == 28 and len(block_ids("sd3_large")) == 42


def test_flux_block_numbers_past_the_layout_are_not_merged():
    assert block_of("double_blocks.19.img_attn.qkv.weight", "flux") is None
    assert block_of("single_blocks.38.linear1.weight", "flux") is None


@pytest.mark.parametrize("key,layout,merges", [
    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight", "flux", True),
    ("double_blocks.0.img_attn.qkv.weight", "flux", True),
    ("double_blocks.0.img_attn.norm.key_norm.scale", "flux", False),  # as the original: not weight/bias
    ("model.diffusion_model.pos_embed", "sd3", False),
    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight", "sd3", True),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1", True),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "sd1", False),
    ("first_stage_model.decoder.conv_in.weight", "sdxl", True),
    ("encoder.block.0.weight", "sd1", False),  # SD keys need "model"
])
def test_merges_by_name(key, layout, merges):
    assert merges_by_name(key, layout) is merges


# Detection -----------------------------------------------------------------------------------------

def shapes_of(family, *, components=None, bare=False):
    specs = [s for s in key_specs(family) if components is None or s.component in components]
    return {(s.aliases[0] if bare and s.aliases else s.key): s.shape for s in specs}


@pytest.mark.parametrize("shapes,label", [
    (shapes_of("flux"), "Flux"),
    (shapes_of("flux", components=("diffuser",)), "Flux"),
    (shapes_of("flux", components=("diffuser",), bare=True), "Flux"),
    (shapes_of("sd3"), "SD3"),
    (shapes_of("sd3", components=("diffuser",)), "SD3"),
])
def test_full_and_diffusion_only_files_are_detected_and_supported(shapes, label):
    arch = detect_architecture(shapes, source="model.safetensors")
    assert arch.label == label and arch.supported
    require_supported(arch, source="model.safetensors")


def test_sd35_large_is_told_by_its_joint_blocks():
    shapes = {f"{DIFFUSION}joint_blocks.{n}.x_block.attn.qkv.weight": (7296, 2432) for n in range(38)}
    arch = detect_architecture(shapes)
    assert (arch.family, arch.layout, arch.label) == ("sd35_large", "sd3_large", "SD3.5 Large")


# Block weights ---------------------------------------------------------------------------------------

def test_flux_weights_numbers_and_readable_groups():
    weights = parse_weights("ALL:0.5, D:1, S10-S12:0.2, T5:0, d3:0.7", "flux")
    assert weights.value_of("D03") == 0.7 and weights.value_of("D18") == 1 and weights.value_of("S11") == 0.2
    assert (weights.value_of("T5"), weights.value_of("CLIP"), weights.value_of("OUT")) == (0, 0.5, 0.5)
    assert parse_weights(weights.as_text(), "flux") == weights == parse_weights(weights.as_readable(), "flux")
    assert weights.as_readable().startswith("CLIP:0.5, T5:0, IN:0.5, D00-D02:1, D03:0.7")


def test_sd3_weights_groups():
    weights = parse_weights("ALL:1, J:0.25, IN:0", "sd3")
    assert [weights.value_of(b) for b in ("CLIP", "IN", "J00", "J23", "OUT")] == [1, 0, 0.25, 0.25, 1]


@pytest.mark.parametrize("text,layout,message", [
    (",".join(["1"] * 26), "flux", r"weights for Flux need 61 values \(CLIP, T5, IN, D00…D18"),
    (",".join(["1"] * 26), "sd3", "SD3 need 28 values"),
    ("ALL:1, D:0", "sd3", "'D' is not a block of the SD3 layout"),
    ("ALL:1, J24:0", "sd3", "'J24' is not a block"),
])
def test_weight_errors_name_the_layout(text, layout, message):
    with pytest.raises(WeightsError, match=message):
        parse_weights(text, layout)


# fp8 merges through merge_to_file ------------------------------------------------------------------

def small_flux(seed, dtype, *, bare=False, components=("diffuser",)):
    """Every Flux key of ``components`` with each dimension cut to at most 8 (what merging needs)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in key_specs("flux"):
        if spec.component in components:
            key = spec.aliases[0] if bare and spec.aliases else spec.key
            tensors[key] = (torch.randn(tuple(min(n, 8) for n in spec.shape), generator=generator) * 0.1).to(dtype)
    return tensors


def write(folder, name, tensors):
    path = folder / name
    save_checkpoint(path, tensors)
    return str(path)


def load(path):
    with open_checkpoint(path) as ckpt:
        return {key: ckpt[key] for key in ckpt}


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_round_trip(tmp_path, dtype):
    """fp8 in, each key computed in fp32, fp8 out (the output keeps model A's dtype)."""
    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, dtype)) for n in (1, 2, 3)]
    recipe = Recipe(paths[0], paths[1], model_c=paths[2], mode="sum Twice", alpha=0.3, beta=0.4,
                    weights_alpha="ALL:0.3, D:0.9, OUT:0")
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    a, b, c, out = (load(p) for p in (*paths, result.path))
    weights = parse_weights(recipe.weights_alpha, "flux")
    merged = {step.key for step in result.plan.steps if step.action == "merge"}
    assert len(merged) == sum(merges_by_name(key, "flux") for key in a) and set(out) == set(a)
    for key in a:
        assert out[key].dtype == dtype
        if key in merged:
            alpha = weights.value_of(block_of(key, "flux"))
            expected = sum_twice(a[key].float(), b[key].float(), c[key].float(), alpha=alpha, beta=0.4).to(dtype)
            assert torch.equal(out[key], expected), key
        else:
            assert torch.equal(out[key], a[key]), key
    with open_checkpoint(result.path) as ckpt:
        assert {dtype_name(ckpt.dtype(k)) for k in ckpt} == {"F8_E4M3" if dtype == FP8[0] else "F8_E5M2"}


def test_fp8_model_merged_with_a_bf16_model(tmp_path):
    paths = [write(tmp_path, "a.safetensors", small_flux(1, torch.float8_e4m3fn)),
             write(tmp_path, "b.safetensors", small_flux(2, torch.bfloat16)),
             write(tmp_path, "c.safetensors", small_flux(3, torch.bfloat16))]
    result = merge_to_file(Recipe(paths[0], paths[1], model_c=paths[2], mode="TIES", alpha=1.0, beta=0.5),
                           tmp_path / "out.safetensors")
    out, a = load(result.path), load(paths[0])
    assert {t.dtype for t in out.values()} == {torch.float8_e4m3fn}
    assert any(not torch.equal(out[k], a[k]) for k in out)


def test_flux_with_text_encoders_merges_clip_and_t5_by_their_blocks(tmp_path):
    components = ("diffuser", "clip_l", "t5xxl", "vae")
    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, torch.bfloat16, components=components))
             for n in (1, 2)]
    recipe = Recipe(paths[0], paths[1], weights_alpha="ALL:1, CLIP:0.25, T5:0.5")
    with open_sources(recipe) as sources:
        plan = plan_merge(recipe, sources)
    steps = {step.key: step for step in plan.steps}
    clip = "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"
    assert (steps[clip].action, steps[clip].alpha) == ("merge", 0.25)
    assert steps["vae.decoder.conv_in.weight"].action == "copy_a"  # the original never merges Flux's VAE


def test_bare_and_t5_keys_merge(tmp_path):
    components = ("diffuser", "t5xxl")
    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, torch.bfloat16, bare=True, components=components))
             for n in (1, 2)]
    recipe = Recipe(paths[0], paths[1])
    with open_sources(recipe) as sources:
        plan = plan_merge(recipe, sources)
    merged = {step.key for step in plan.steps if step.action == "merge"}
    assert "double_blocks.0.img_attn.qkv.weight" in merged
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight" in merged


@pytest.mark.parametrize("stretch", [None, 7])  # whole tensors; 7 values at a time (uneven last stretch)
def test_fp8_weight_sum(tmp_path, monkeypatch, stretch):
    """fp8 inputs are widened to fp32 (by table), merged and rounded to fp8 once: as torch's own route,
    whether a key goes whole or a stretch at a time (engine.STRETCH; real Flux keys are over it)."""
    if stretch is not None:
        import mergers.engine
        monkeypatch.setattr(mergers.engine, "STRETCH", stretch)
    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, torch.float8_e4m3fn)) for n in (1, 2)]
    result = merge_to_file(Recipe(paths[0], paths[1], mode="Weight sum", alpha=0.3), tmp_path / "out.safetensors")
    a, b, out = load(paths[0]), load(paths[1]), load(result.path)
    merged = [key for key in out if key.endswith(".weight") and a[key].dtype == torch.float8_e4m3fn]
    assert len(merged) > 10
    for key in merged:
        expected = torch.lerp(a[key].float(), b[key].float(), 0.3).to(torch.float8_e4m3fn)
        assert_lerp_equal(out[key], expected, key)


def test_fp8_add_difference_a_stretch_at_a_time(tmp_path, monkeypatch):
    import mergers.engine
    monkeypatch.setattr(mergers.engine, "STRETCH", 5)
    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, torch.float8_e5m2)) for n in (1, 2, 3)]
    result = merge_to_file(Recipe(*paths, mode="Add difference", alpha=0.7), tmp_path / "out.safetensors")
    a, b, c, out = (load(path) for path in (*paths, result.path))
    key = "model.diffusion_model.double_blocks.3.img_mlp.0.weight"
    expected = (a[key].float() + (b[key].float() - c[key].float()) * 0.7).to(torch.float8_e5m2)
    assert torch.equal(out[key].view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_widening_by_table_gives_torchs_bits_for_every_code(dtype):
    from mergers.checkpoint import BufferPool
    from mergers.engine import _widen

    codes = torch.arange(256, dtype=torch.uint8).repeat(1024)  # over the pool's minimum: the pooled route
    widened = _widen(codes.view(dtype), torch.float32, torch.device("cpu"), BufferPool(keep_bytes=1 << 20))
    expected = codes.view(dtype).float()
    assert torch.equal(widened.isnan(), expected.isnan())
    assert torch.equal(widened[~expected.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_finite_check_by_code_agrees_with_torch_for_every_code(dtype):
    from mergers.engine import is_finite

    for code in range(256):
        value = torch.tensor([code, 0], dtype=torch.uint8).view(dtype)
        assert is_finite(value) == bool(torch.isfinite(value.float()).all()), hex(code)


def test_fp8_output_dtype_option(tmp_path):
    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, torch.bfloat16)) for n in (1, 2)]
    result = merge_to_file(Recipe(paths[0], paths[1], mode="SLERP", dtype="fp8_e4m3fn"), tmp_path / "out.safetensors")
    assert {t.dtype for t in load(result.path).values()} == {torch.float8_e4m3fn}


# A full-size Flux pair, planned from headers (sparse files: nothing but the header is written) -----

def write_sparse_checkpoint(path, specs, dtype="F8_E4M3"):
    header, offset = {}, 0
    for spec in specs:
        size = torch.Size(spec.shape).numel()  # one byte per fp8 value
        header[spec.key] = {"dtype": dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)
    return path


def test_full_size_flux_fp8_merge_is_planned_key_by_key(tmp_path):
    specs = [spec for spec in key_specs("flux") if spec.component == "diffuser"]
    paths = [str(write_sparse_checkpoint(tmp_path / f"flux_{n}.safetensors", specs)) for n in (1, 2)]
    assert os.path.getsize(paths[0]) > 11.9e9  # 11.9 G parameters, one byte each
    recipe = Recipe(paths[0], paths[1], mode="SLERP", weights_alpha="ALL:0.5, S:0.8")
    with open_sources(recipe) as sources:
        plan = plan_merge(recipe, sources)
    merges = [step for step in plan.steps if step.action == "merge"]
    assert plan.arch.family == "flux" and len(plan.steps) == len(specs)
    assert len(merges) == sum(merges_by_name(spec.key, "flux") for spec in specs)
    assert {step.spec.dtype for step in plan.steps} == {torch.float8_e4m3fn}
    total = sum(step.spec.nbytes for step in plan.steps)
    largest = max(step.spec.nbytes for step in plan.steps)
    # The whole model is 11.9 GB; one key, the most a merge holds of any input, is 66 MB (single_blocks linear1).
    assert 11.9e9 < total < 12.0e9 and largest == 21504 * 3072
    assert {step.alpha for step in merges if block_of(step.key, "flux").startswith("S")} == {0.8}


@pytest.mark.parametrize("mode", ["Triple sum", "sum Twice"])
def test_three_model_elementwise_methods_give_the_same_bytes_a_stretch_at_a_time(tmp_path, monkeypatch, mode):
    """Widened inputs (fp8 here; sum Twice also widens fp16) go a stretch at a time: same bytes as whole keys
    (on Windows within 1 ulp: see ``assert_lerp_equal``)."""
    import mergers.engine

    paths = [write(tmp_path, f"{n}.safetensors", small_flux(n, torch.float8_e4m3fn)) for n in (1, 2, 3)]
    recipe = Recipe(*paths, mode=mode, alpha=0.3, beta=0.2)
    whole = load(merge_to_file(recipe, tmp_path / "whole.safetensors").path)
    monkeypatch.setattr(mergers.engine, "STRETCH", 5)
    stretched = load(merge_to_file(recipe, tmp_path / "stretched.safetensors").path)
    assert whole.keys() == stretched.keys()
    for key in whole:
        assert_lerp_equal(stretched[key], whole[key], key)
