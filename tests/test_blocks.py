"""Tests for mergers.arch.blocks: every real SD1, SD2 and SDXL key gets the original's block."""

import re
from collections import Counter

import pytest

from mergers.arch import SD1_BLOCKS, SDXL_BLOCKS, SDXL_FINE_BLOCKS, block_ids, block_of, fine_block_of_sdxl, key_specs
from mergers.errors import ArchitectureError

# ---------------------------------------------------------------------------------------------
# Reference: the original's blockfromkey (mergers.py l.1459-1528) and its caller's membership test
# (l.443-451), restated step by step with its own index arithmetic, "Not Merge" spelled None.

ORIGINAL_BLOCKID = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
ORIGINAL_BLOCKIDXLL = (["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
                       + ["VAE"])


def reference_sd1(key):
    weight_index = -1
    if "time_embed" in key:
        weight_index = 0
    elif ".out." in key:
        weight_index = 12 + 1 + 12 - 1
    elif m := re.search(r"\.input_blocks\.(\d+)\.", key):
        weight_index = int(m.group(1))
    elif re.search(r"\.middle_block\.(\d+)\.", key):
        weight_index = 12
    elif m := re.search(r"\.output_blocks\.(\d+)\.", key):
        weight_index = 12 + 1 + int(m.group(1))
    return ORIGINAL_BLOCKID[weight_index + 1]


def reference_sdxl_pair(key):
    if not ("weight" in key or "bias" in key):
        return None, None
    if "label_emb" in key:
        return "LABEL", "IN00"
    if "time_embed" in key:
        return "TIME", "IN00"
    if "conditioner.embedders.0." in key:
        return "CLIPL", "BASE"
    if "conditioner.embedders.1." in key:
        return "CLIPG", "BASE"
    if "first_stage_model" in key:
        return "VAE", "BASE"
    if "model.diffusion_model" in key:
        if "model.diffusion_model.out." in key:
            return "OUT9", "OUT08"
        block = re.findall(r"input|mid|output", key)
        block = block[0].upper().replace("PUT", "") if block else ""
        nums = re.sub(r"\D", "", key)[: 1 if "MID" in block else 2] + ("0" if "MID" in block else "")
        if len(nums) == 0:
            return None, None  # the original returns a bare "M00" here, which its caller cannot unpack
        add = re.findall(r"transformer_blocks\.(\d+)\.", key)[0] if "transformer" in key else ""
        return block + nums + add, (block + "0" + nums[0] if "MID" not in block else "M00")
    return None, None


def reference_sdxl(key):
    fine, block = reference_sdxl_pair(key)
    return (fine, block) if block in ORIGINAL_BLOCKIDXLL[:-1] else (None, None)


# ---------------------------------------------------------------------------------------------
# Explicit expectations for representative keys of every kind.

SD1_EXPECTED = {
    "model.diffusion_model.time_embed.0.weight": "IN00",
    "model.diffusion_model.time_embed.2.bias": "IN00",
    "model.diffusion_model.input_blocks.0.0.weight": "IN00",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": "IN01",
    "model.diffusion_model.input_blocks.2.0.in_layers.0.weight": "IN02",
    "model.diffusion_model.input_blocks.3.0.op.weight": "IN03",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": "IN04",
    "model.diffusion_model.input_blocks.5.1.proj_out.bias": "IN05",
    "model.diffusion_model.input_blocks.6.0.op.bias": "IN06",
    "model.diffusion_model.input_blocks.7.1.norm.weight": "IN07",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.2.weight": "IN08",
    "model.diffusion_model.input_blocks.9.0.op.weight": "IN09",
    "model.diffusion_model.input_blocks.10.0.emb_layers.1.weight": "IN10",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": "IN11",
    "model.diffusion_model.middle_block.0.in_layers.2.weight": "M00",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight": "M00",
    "model.diffusion_model.middle_block.2.out_layers.3.weight": "M00",
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": "OUT00",
    "model.diffusion_model.output_blocks.1.0.in_layers.0.bias": "OUT01",
    "model.diffusion_model.output_blocks.2.1.conv.weight": "OUT02",
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight": "OUT03",
    "model.diffusion_model.output_blocks.4.1.proj_in.weight": "OUT04",
    "model.diffusion_model.output_blocks.5.2.conv.bias": "OUT05",
    "model.diffusion_model.output_blocks.6.0.emb_layers.1.bias": "OUT06",
    "model.diffusion_model.output_blocks.7.1.norm.bias": "OUT07",
    "model.diffusion_model.output_blocks.8.2.conv.weight": "OUT08",
    "model.diffusion_model.output_blocks.9.1.transformer_blocks.0.norm3.weight": "OUT09",
    "model.diffusion_model.output_blocks.10.0.out_layers.0.weight": "OUT10",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": "OUT11",
    "model.diffusion_model.out.0.weight": "OUT11",
    "model.diffusion_model.out.2.bias": "OUT11",
    # Text encoders (CLIP-L either spelling, OpenCLIP), VAE, EMA, buffers: BASE.
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight": "BASE",
    "cond_stage_model.transformer.embeddings.token_embedding.weight": "BASE",
    "cond_stage_model.transformer.text_model.embeddings.position_ids": "BASE",
    "cond_stage_model.model.transformer.resblocks.9.mlp.c_proj.weight": "BASE",
    "cond_stage_model.model.text_projection": "BASE",
    "first_stage_model.decoder.conv_out.weight": "BASE",
    "first_stage_model.encoder.mid.attn_1.proj_out.bias": "BASE",
    "first_stage_model.quant_conv.weight": "BASE",
    "model_ema.decay": "BASE",
    "model_ema.diffusion_modelinput_blocks11proj_inweight": "BASE",
    "model_ema.diffusion_modelout0weight": "BASE",
    "model_ema.diffusion_modeltime_embed0weight": "IN00",  # "time_embed" is a plain substring test
    "alphas_cumprod": "BASE",
    "betas": "BASE",
}

SDXL_EXPECTED = {
    "model.diffusion_model.label_emb.0.0.weight": ("LABEL", "IN00"),
    "model.diffusion_model.label_emb.0.2.bias": ("LABEL", "IN00"),
    "model.diffusion_model.time_embed.0.weight": ("TIME", "IN00"),
    "model.diffusion_model.input_blocks.0.0.weight": ("IN00", "IN00"),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": ("IN10", "IN01"),
    "model.diffusion_model.input_blocks.3.0.op.bias": ("IN30", "IN03"),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": ("IN41", "IN04"),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": ("IN411", "IN04"),
    "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.norm1.bias": ("IN510", "IN05"),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": ("IN719", "IN07"),
    "model.diffusion_model.input_blocks.8.0.skip_connection.bias": ("IN80", "IN08"),
    "model.diffusion_model.middle_block.0.in_layers.0.weight": ("MID00", "M00"),
    "model.diffusion_model.middle_block.1.transformer_blocks.3.attn2.to_k.weight": ("MID103", "M00"),
    "model.diffusion_model.middle_block.2.out_layers.3.bias": ("MID20", "M00"),
    "model.diffusion_model.output_blocks.0.1.transformer_blocks.5.attn1.to_v.weight": ("OUT015", "OUT00"),
    "model.diffusion_model.output_blocks.2.2.conv.weight": ("OUT22", "OUT02"),
    "model.diffusion_model.output_blocks.5.2.conv.bias": ("OUT52", "OUT05"),
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight": ("OUT80", "OUT08"),
    "model.diffusion_model.out.0.weight": ("OUT9", "OUT08"),
    "model.diffusion_model.out.2.bias": ("OUT9", "OUT08"),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight": ("CLIPL", "BASE"),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.weight": ("CLIPG", "BASE"),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": ("CLIPG", "BASE"),
    "first_stage_model.decoder.up.0.block.0.conv1.weight": ("VAE", "BASE"),
    # Not Merge: no "weight"/"bias" in the name, or outside the model.
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (None, None),
    "conditioner.embedders.1.model.text_projection": (None, None),
    "conditioner.embedders.1.model.logit_scale": (None, None),
    "conditioner.embedders.1.model.positional_embedding": (None, None),
    "alphas_cumprod": (None, None),
    "v_pred": (None, None),
    "edm_vpred.sigma_max": (None, None),
    "model_ema.some_weight": (None, None),
    # The original takes the block number from the key's first digit and skips blocks it lacks.
    "model.diffusion_model.input_blocks.9.0.op.weight": (None, None),
    "model.diffusion_model.output_blocks.10.0.op.weight": ("OUT10", "OUT01"),
    "model.diffusion_model.unknown.weight": (None, None),
}


def all_names(family):
    """Every key and every alias of ``family``'s real key list."""
    return [name for spec in key_specs(family) for name in (spec.key, *spec.aliases)]


@pytest.mark.parametrize("key,expected", SD1_EXPECTED.items())
def test_sd1_representative_keys(key, expected):
    assert block_of(key, "sd1") == expected


@pytest.mark.parametrize("key,expected", SDXL_EXPECTED.items())
def test_sdxl_representative_keys(key, expected):
    assert (fine_block_of_sdxl(key), block_of(key, "sdxl")) == expected


def test_representative_keys_agree_with_reference():
    for key in SD1_EXPECTED:
        assert block_of(key, "sd1") == reference_sd1(key), key
    for key in SDXL_EXPECTED:
        assert (fine_block_of_sdxl(key), block_of(key, "sdxl")) == reference_sdxl(key), key


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_every_sd1_layout_key_matches_the_original(family):
    names = all_names(family)
    mismatches = [(key, block_of(key, "sd1"), reference_sd1(key)) for key in names
                  if block_of(key, "sd1") != reference_sd1(key)]
    assert mismatches == []


def test_every_sdxl_key_matches_the_original():
    ours = {key: (fine_block_of_sdxl(key), block_of(key, "sdxl")) for key in all_names("sdxl")}
    mismatches = [(key, got, reference_sdxl(key)) for key, got in ours.items() if got != reference_sdxl(key)]
    assert mismatches == []


@pytest.mark.parametrize("family,layout", [("sd1", "sd1"), ("sd2", "sd1"), ("sdxl", "sdxl")])
def test_every_block_gets_keys(family, layout):
    counts = Counter(block_of(key, layout) for key in all_names(family))
    assert set(block_ids(layout)) <= set(counts)
    assert set(counts) - {None} <= set(block_ids(layout))
    # Down-sampling convolutions: one weight and one bias each.
    assert counts["IN03"] == counts["IN06"] == 2


@pytest.mark.parametrize("family,layout,blocks", [("sd1", "sd1", SD1_BLOCKS), ("sd2", "sd1", SD1_BLOCKS),
                                                  ("sdxl", "sdxl", SDXL_BLOCKS)])
def test_unet_keys_are_all_assigned_and_others_are_base(family, layout, blocks):
    for spec in key_specs(family):
        block = block_of(spec.key, layout)
        if spec.component in ("vae", "clip_l", "clip_g", "clip_h") and ("weight" in spec.key or "bias" in spec.key):
            assert block == "BASE", spec.key
        elif spec.key.startswith("model.diffusion_model."):
            assert block in blocks[1:], spec.key
        elif layout == "sd1":
            assert block in ("BASE", "IN00"), spec.key  # EMA time_embed copies hit the substring rule
        else:
            assert block is None, spec.key


def test_sdxl_has_no_input_blocks_past_8():
    keys = all_names("sdxl")
    assert not any(re.search(r"\.(input|output)_blocks\.(9|1\d)\.", key) for key in keys)
    assert {block_of(key, "sdxl") for key in keys} == set(SDXL_BLOCKS) | {None}


def test_sd1_counts_per_block():
    counts = Counter(block_of(spec.key, "sd1") for spec in key_specs("sd1") if not spec.optional)
    # time_embed (4) + input conv (2); middle: 2 res blocks of 12 + 1 transformer of 22.
    assert (counts["IN00"], counts["M00"], counts["OUT11"]) == (6, 46, 42)
    assert sum(counts.values()) == sum(1 for spec in key_specs("sd1") if not spec.optional)


def test_sdxl_fine_blocks_cover_the_110_names():
    assert len(SDXL_FINE_BLOCKS) == len(set(SDXL_FINE_BLOCKS)) == 110
    produced = {fine_block_of_sdxl(key) for key in all_names("sdxl")} - {None}
    assert produced == set(SDXL_FINE_BLOCKS) - {"IN0"}  # the original never produces "IN0"


def test_fine_block_is_none_exactly_when_block_is_none():
    for key in all_names("sdxl"):
        assert (fine_block_of_sdxl(key) is None) == (block_of(key, "sdxl") is None), key


def test_sd1_block_numbers_past_11_are_not_merged():
    assert block_of("model.diffusion_model.input_blocks.12.0.op.weight", "sd1") is None
    assert block_of("model.diffusion_model.output_blocks.12.0.op.weight", "sd1") is None


@pytest.mark.parametrize("layout", ["sd4", "nope"])
def test_layouts_without_block_rules_raise(layout):
    with pytest.raises(ArchitectureError, match=layout):
        block_of("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", layout)
