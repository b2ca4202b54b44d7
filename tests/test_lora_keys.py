"""LoRA module names → checkpoint keys and blocks, on every key of real SD1.5, SD2 and SDXL checkpoints."""

from __future__ import annotations

import pytest
import torch

from mergers.arch import block_of, key_specs
from mergers.errors import CheckpointError
from mergers.lora.blocks import parse_entries, parse_entry, spread_to_26
from mergers.lora.extract import extraction_layers
from mergers.lora.formats import group_modules
from mergers.lora.keys import canonical_module_name, diffusers_unet_path, module_table
from mergers.lora.match import reference_table

REAL_SHAPES = {family: {s.key: s.shape for s in key_specs(family)} for family in ("sd1", "sd2", "sdxl")}
# kohya's trainer logs these counts: "create LoRA for Text Encoder: 72 modules", "for U-Net: 192 modules" (SD1);
# SDXL: 72 + 192 text-encoder modules (CLIP-L 12 layers, bigG 32 layers × 6) and 722 U-Net modules.
KOHYA_MODULE_COUNTS = {"sd1": 264, "sdxl": 986}

# Names seen in published kohya / LyCORIS files → the key A1111 changes for them.
KNOWN = {
    "sd1": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "lora_unet_mid_block_attentions_0_proj_out": "model.diffusion_model.middle_block.1.proj_out.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut":
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "model.diffusion_model.input_blocks.9.0.op.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "model.diffusion_model.output_blocks.2.1.conv.weight",
        "lora_unet_up_blocks_2_upsamplers_0_conv": "model.diffusion_model.output_blocks.8.2.conv.weight",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "lora_unet_conv_in": "model.diffusion_model.input_blocks.0.0.weight",
        "lora_unet_time_embedding_linear_2": "model.diffusion_model.time_embed.2.weight",
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight",
    },
    "sd2": {
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
        "lora_te_text_model_encoder_layers_22_self_attn_v_proj":
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
    },
    "sdxl": {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "lora_unet_output_blocks_2_1_proj_in": "model.diffusion_model.output_blocks.2.1.proj_in.weight",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k":
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "model.diffusion_model.output_blocks.2.2.conv.weight",
        "lora_unet_label_emb_0_0": "model.diffusion_model.label_emb.0.0.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2":
            "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight",
    },
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_known_names_address_their_keys(family):
    table = module_table(REAL_SHAPES[family])
    for name, key in KNOWN[family].items():
        assert table[name].key == key, name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_linear_and_conv_of_the_real_layout_has_a_lora_name(family):
    table = module_table(REAL_SHAPES[family])
    addressed = {target.key for target in table.values()}
    layers = [k for k, shape in REAL_SHAPES[family].items() if len(shape) >= 2 and k.endswith("weight")
              and "embedding" not in k  # token embeddings: no LoRA trains them
              and k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner."))]
    assert set(layers) <= addressed


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_unet_layer_has_a_diffusers_name_too(family):
    unet = [k for k, s in REAL_SHAPES[family].items() if k.startswith("model.diffusion_model.") and len(s) >= 2]
    paths = {k: diffusers_unet_path(k[len("model.diffusion_model."):-len(".weight")]) for k in unet}
    assert None not in paths.values()
    assert len(set(paths.values())) == len(paths)  # one layer each


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_layers_kohya_trains_match_its_module_counts(family):
    layers = extraction_layers(REAL_SHAPES[family], family, rank=4, conv_rank=None)
    assert len(layers) == KOHYA_MODULE_COUNTS[family]


@pytest.mark.parametrize("family,layout", [("sd1", "sd1"), ("sd2", "sd1"), ("sdxl", "sdxl")])
def test_every_lora_target_gets_a_block(family, layout):
    blocks = {block_of(t.key, layout) for t in reference_table(family).values()}
    assert None not in blocks
    assert {"BASE", "IN01", "M00"} <= blocks


def test_sd2_qkv_are_thirds_of_in_proj():
    table = reference_table("sd2")
    parts = [table[f"lora_te_text_model_encoder_layers_3_self_attn_{p}_proj"] for p in "qkv"]
    assert [p.part for p in parts] == [0, 1, 2]
    assert parts[0].delta_shape == (1024, 1024)


@pytest.mark.parametrize("raw,expected", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("base_model.model.unet.mid_block.attentions.0.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("text_encoder_2.text_model.encoder.layers.5.mlp.fc1", "lora_te2_text_model_encoder_layers_5_mlp_fc1"),
    ("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out_lora",
     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_0_mlp_fc1"),
])
def test_diffusers_and_peft_names_become_kohya_names(raw, expected):
    assert canonical_module_name(raw) == expected


def test_peft_files_group_into_modules():
    shapes = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": (4, 8),
              "unet.mid_block.attentions.0.proj_in.lora_B.weight": (8, 4),
              "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.down.weight": (4, 8),
              "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.up.weight": (8, 4)}
    modules = group_modules(shapes)
    assert set(modules) == {"lora_unet_mid_block_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"}
    assert modules["lora_unet_mid_block_attentions_0_proj_in"].parts["up"].endswith("lora_B.weight")


def test_dora_is_refused_by_name():
    shapes = {"lora_te_x.lora_down.weight": (4, 8), "lora_te_x.lora_up.weight": (8, 4), "lora_te_x.dora_scale": (1, 8)}
    with pytest.raises(CheckpointError, match="DoRA modules are not supported yet.*lora_te_x.dora_scale"):
        group_modules(shapes, source="d.safetensors")


def test_a_checkpoint_is_not_a_lora():
    with pytest.raises(CheckpointError, match="no LoRA part"):
        group_modules({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}, source="model.safetensors")


def test_block_lists_spread_like_the_originals_to26():
    values = spread_to_26([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17])
    assert (values["BASE"], values["IN01"], values["IN04"], values["M00"], values["OUT03"], values["OUT11"]) == \
        (1, 2, 4, 8, 9, 17)
    assert values["IN00"] == values["IN03"] == values["OUT00"] == 0
    xl = spread_to_26(list(range(12)))
    assert (xl["IN04"], xl["M00"], xl["OUT05"], xl["IN01"]) == (1, 5, 11, 0)


def test_entries_read_presets_numbers_and_paths():
    entries = parse_entries("C:/loras/a.safetensors:0.5:OUTALL\nb:1:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1, c")
    assert [e.name for e in entries] == ["C:/loras/a.safetensors", "b", "c"]
    assert entries[0].ratio_of("OUT05") == 0.5 and entries[0].ratio_of("IN01") == 0
    assert entries[1].ratio_of("BASE") == 1 and entries[1].ratio_of("OUT11") == 1 and entries[1].ratio_of("M00") == 0
    assert entries[2].ratio == 1 and entries[2].block_values is None


def test_a_bad_block_string_names_the_lora():
    with pytest.raises(Exception, match="style: 3 block values"):
        parse_entry("style:1:1,2,3")
    with pytest.raises(Exception, match="unknown LoRA block preset 'NOPE'"):
        parse_entry("style:1:NOPE")


def test_tensor_reads_are_not_needed_for_shapes():
    shapes = {"lora_te_x.hada_w1_a": (8, 2), "lora_te_x.hada_w1_b": (2, 36), "lora_te_x.hada_w2_a": (8, 2),
              "lora_te_x.hada_w2_b": (2, 36), "lora_te_y.lokr_w1": (2, 2), "lora_te_y.lokr_w2_a": (4, 1),
              "lora_te_y.lokr_w2_b": (1, 5)}
    modules = group_modules(shapes)
    assert modules["lora_te_x"].delta_shape(shapes) == (8, 36)
    assert modules["lora_te_y"].delta_shape(shapes) == (8, 10)
    reader = {name: torch.ones(shape) for name, shape in shapes.items()}
    assert tuple(modules["lora_te_y"].delta(reader, scale=1.0).shape) == (8, 10)
