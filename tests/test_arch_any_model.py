"""Issue #17: every diffusion model merges. Layouts are data, today's models are recognised, and a model
no file describes merges key by key with an automatic block layout."""

from __future__ import annotations

import json

import pytest
import torch
from arch_keys import ARCH_KEYS

from mergers.arch import (
    Architecture,
    LayoutFileError,
    block_ids,
    block_of,
    detect_architecture,
    key_fingerprint,
    layout_named,
    registry,
)
from mergers.arch.auto import auto_layout_from_name, auto_layout_name
from mergers.checkpoint import open_checkpoint
from mergers.errors import ArchitectureError, WeightsError
from mergers.merge import merge_to_file
from mergers.metadata import stored_recipe
from mergers.recipe import Recipe
from mergers.weights import parse_weights, scale_preset
from mergers.writer import save_checkpoint


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SUPERMERGER_LAYOUTS", str(tmp_path / "no-user-layouts"))


# Recognised architectures -------------------------------------------------------------------------

# family -> (label, layout, number of block ids, {key: block})
RECOGNISED = {
    "chroma": ("Chroma", "chroma", 61, {"distilled_guidance_layer.layers.4.in_layer.weight": "G",
                                        "double_blocks.18.img_mlp.0.weight": "D18", "single_blocks.0.linear1.weight": "S00",
                                        "img_in.weight": "IN", "final_layer.linear.weight": "OUT"}),
    "qwen_image": ("Qwen-Image", "qwen_image", 63, {"transformer_blocks.59.attn.to_q.weight": "T59", "txt_norm.weight": "IN",
                                                   "time_text_embed.timestep_embedder.linear_1.weight": "IN",
                                                   "norm_out.linear.weight": "OUT", "proj_out.weight": "OUT"}),
    "hidream": ("HiDream-I1", "hidream", 51, {"double_stream_blocks.15.block.ff_i.gate.weight": "D15",
                                              "single_stream_blocks.31.block.attn1.to_q.weight": "S31",
                                              "caption_projection.48.linear.weight": "IN", "final_layer.linear.weight": "OUT"}),
    "lumina2": ("Lumina 2", "lumina2", 33, {"noise_refiner.1.attention.qkv.weight": "NR01", "context_refiner.0.ffn_norm1.weight": "CR00",
                                            "layers.25.feed_forward.w2.weight": "L25", "cap_embedder.1.weight": "IN",
                                            "norm_final.weight": "OUT"}),
    "z_image": ("Z-Image", "z_image", 37, {"layers.29.attention.out.weight": "L29"}),
    "wan": ("Wan 2.1/2.2 14B", "wan", 43, {"blocks.39.ffn.0.weight": "B39", "blocks.0.modulation": "B00",
                                          "patch_embedding.weight": "IN", "head.modulation": "OUT"}),
    "wan_small": ("Wan 2.1 1.3B / 2.2 5B", "wan_small", 33, {"blocks.29.self_attn.q.weight": "B29"}),
    "auraflow": ("AuraFlow", "auraflow", 39, {"double_layers.3.modX.1.weight": "D03", "single_layers.31.mlp.c_fc1.weight": "S31",
                                              "positional_encoding": "IN", "modF.1.weight": "OUT"}),
    "hunyuan_dit": ("Hunyuan-DiT", "hunyuan_dit", 43, {"blocks.39.skip_linear.weight": "B39", "mlp_t5.0.weight": "IN",
                                                       "final_layer.adaLN_modulation.1.weight": "OUT"}),
    "pixart": ("PixArt-Σ", "pixart", 31, {"blocks.27.scale_shift_table": "B27", "t_block.1.weight": "IN",
                                          "final_layer.scale_shift_table": "OUT"}),
    "kolors": ("Kolors", "sdxl", 20, {"model.diffusion_model.encoder_hid_proj.weight": "IN00",
                                      "model.diffusion_model.output_blocks.8.0.skip_connection.weight": "OUT08"}),
    "stable_cascade_c": ("Stable Cascade stage C", "stable_cascade_c", 7, {"down_blocks.1.71.mapper.weight": "D1",
                                                                          "up_upscalers.0.1.blocks.1.weight": "U0",
                                                                          "clip_txt_mapper.weight": "IN", "clf.1.weight": "OUT"}),
    "stable_cascade_b": ("Stable Cascade stage B", "stable_cascade_b", 11, {"down_blocks.3.0.depthwise.weight": "D3",
                                                                           "effnet_mapper.0.weight": "IN"}),
    "sd35_medium": ("SD3.5 Medium", "sd3", 28, {"joint_blocks.12.x_block.attn2.qkv.weight": "J12"}),
    "sd35_large": ("SD3.5 Large", "sd3_large", 42, {"joint_blocks.37.x_block.attn.qkv.weight": "J37"}),
}


@pytest.mark.parametrize("family", list(RECOGNISED))
def test_each_recognised_architecture_is_detected_and_gets_its_blocks(family):
    shapes = ARCH_KEYS[family]()
    label, layout, count, expected = RECOGNISED[family]
    arch = detect_architecture(shapes, source=f"{family}.safetensors")
    assert (arch.family, arch.label, arch.layout, arch.known) == (family, label, layout, True)
    assert len(block_ids(layout)) == count
    assert {key: block_of(key, layout) for key in expected} == expected
    used = {block_of(key, layout) for key in shapes}
    assert None not in used, "every diffusion key of a recognised model has a block"
    # Every block of the diffusion model gets keys (text-encoder blocks stay empty in a diffusion-only file).
    assert set(block_ids(layout)) - used <= {"TE", "T5", "CLIP", "BASE"}


def test_every_recognised_family_in_the_shipped_files_has_a_key_list_here():
    shipped = set(registry().architectures) - {"sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux"}
    assert shipped == set(RECOGNISED)


def test_chroma_is_not_flux_and_flux_is_not_chroma():
    flux = {"double_blocks.0.img_attn.qkv.weight": (4, 4), "guidance_in.in_layer.weight": (4, 4)}
    assert detect_architecture(flux).family == "flux"
    assert detect_architecture(flux | {"distilled_guidance_layer.norms.0.scale": (4,)}).family == "chroma"


def test_z_image_is_told_from_lumina2_by_its_caption_width():
    assert detect_architecture(ARCH_KEYS["lumina2"]()).family == "lumina2"
    assert detect_architecture(ARCH_KEYS["z_image"]()).family == "z_image"


def test_new_layouts_merge_every_float_key_and_keep_the_vae_out():
    assert block_of("vae.decoder.conv_in.weight", "qwen_image") is None
    assert block_of("text_encoders.qwen25_7b.model.layers.0.mlp.up_proj.weight", "qwen_image") == "TE"
    assert block_of("transformer_blocks.60.attn.to_q.weight", "qwen_image") is None  # past the layout: not merged


# Automatic layouts --------------------------------------------------------------------------------

def unknown_model(value: float, *, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A model no layout file describes: 4 numbered blocks under "net.", an embedding, a head, a counter."""
    names = ["net.embed.weight", "net.pos"] + [f"net.blocks.{n}.{part}" for n in range(4)
                                                 for part in ("attn.q.weight", "attn.k.weight", "mlp.weight")]
    tensors = {name: torch.full((2, 2), value) for name in names + ["net.head.weight"]}
    return tensors | {"net.step": torch.tensor([7], dtype=torch.int64)} | (extra or {})


def test_automatic_layout_groups_blocks_in_order_and_puts_the_rest_in_and_out():
    shapes = {key: tuple(t.shape) for key, t in unknown_model(1.0).items()}
    arch = detect_architecture(shapes, source="mystery.safetensors")
    assert (arch.family, arch.known) == ("unknown", False)
    assert arch.label == "unknown (16 keys, prefix net.)"
    assert arch.layout == "auto:net.blocks=4"
    assert block_ids(arch.layout) == ("IN", "B00", "B01", "B02", "B03", "OUT")
    assert [block_of(k, arch.layout) for k in ("net.embed.weight", "net.pos", "net.blocks.3.mlp.weight", "net.head.weight")] \
        == ["IN", "IN", "B03", "OUT"]


def test_automatic_layout_of_a_flux_like_model_with_text_encoder_and_vae():
    shapes = ({f"model.diffusion_model.double_blocks.{n}.{p}.weight": (2,) for n in range(3) for p in "abc"}
              | {f"model.diffusion_model.single_blocks.{n}.{p}.weight": (2,) for n in range(2) for p in "abc"}
              | {"text_encoders.t5.encoder.block.0.layer.0.weight": (2,), "vae.decoder.conv_in.weight": (2,),
                 "model.diffusion_model.final_layer.linear.weight": (2,)})
    name = auto_layout_name(shapes)
    assert name == "auto:TE;VAE;model.diffusion_model.double_blocks=3;model.diffusion_model.single_blocks=2"
    layout = auto_layout_from_name(name)
    assert layout.blocks == ("TE", "IN", "D00", "D01", "D02", "S00", "S01", "OUT", "VAE")
    assert layout.block_of("vae.decoder.conv_in.weight") == "VAE"
    assert layout.block_of("text_encoders.t5.encoder.block.0.layer.0.weight") == "TE"
    assert layout.block_of("model.diffusion_model.final_layer.linear.weight") == "OUT"


def test_sequential_indices_are_not_mistaken_for_blocks():
    shapes = {"t_embedder.mlp.0.weight": (2,), "t_embedder.mlp.2.weight": (2,), "adaLN.1.weight": (2,)}
    assert auto_layout_name(shapes) == "auto:"
    assert block_ids("auto:") == ("IN", "OUT")


def test_readable_weights_presets_and_groups_work_on_an_automatic_layout():
    layout = "auto:TE;double_blocks=10;single_blocks=2"
    weights = parse_weights("ALL:0.5, D00-D09:1", layout)
    assert weights.values == (0.5, 0.5) + (1.0,) * 10 + (0.5, 0.5, 0.5)
    assert parse_weights("ALL:0, S:1, d3:0.25", layout).value_of("D03") == 0.25
    assert parse_weights(weights.as_readable(), layout) == weights
    grad_v = parse_weights("GRAD_V", layout)  # 26 SD1 values stretched over the layout's 15 blocks
    assert grad_v.value_of("TE") == 0 and grad_v.value_of("IN") == 1 and grad_v.value_of("OUT") == 1
    # 14 blocks read the V (25 points) at n/13 of its length: the bottom falls between blocks 6 and 7, at 1/13
    assert min(grad_v.values[1:]) == pytest.approx(1 / 13, abs=1e-9)
    with pytest.raises(WeightsError, match=r"'X00' is not a block of the automatic layout; valid ids: TE, IN, D00…D09"):
        parse_weights("ALL:1, X00:0", layout)


def test_scale_preset_keeps_base_for_text_encoders_and_stretches_the_rest():
    values = [9.0] + [float(n) for n in range(25)]
    assert scale_preset(values, ["CLIP", "T5", "IN", "D00", "S00", "OUT"]) == [9.0, 9.0, 0.0, 8.0, 16.0, 24.0]
    # Flux: CLIP and T5 take BASE (0); IN…OUT (59 blocks) read the V at n/58: D00 at 24/58 of a 12-step side
    assert parse_weights("GRAD_V", "flux").values[:4] == (0.0, 0.0, 1.0, round(1 - 24 / 58 / 12, 10))


# Merging a model no file describes ----------------------------------------------------------------

@pytest.fixture
def unknown_files(tmp_path):
    paths = []
    for name, value in (("a", 1.0), ("b", 3.0), ("c", 2.0)):
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(path, unknown_model(value))
        paths.append(str(path))
    return paths


def merged(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {key: ckpt[key] for key in ckpt}


BLOCK_WEIGHTS = "ALL:0.5, B00-B01:1, OUT:0"
EXPECTED_ALPHA = {"net.embed.weight": 0.5, "net.pos": 0.5, "net.blocks.0.attn.q.weight": 1.0,
                  "net.blocks.1.mlp.weight": 1.0, "net.blocks.3.attn.k.weight": 0.5, "net.head.weight": 0.0}


@pytest.mark.parametrize("mode,result", [
    ("weight_sum", lambda alpha: 1 + alpha * (3 - 1)),  # A + α(B − A)
    ("add_difference", lambda alpha: 1 + alpha * (3 - 2)),  # A + α(B − C)
    ("ties", lambda alpha: 1 + alpha * (2 + 1) / 2),  # task vectors 2 and 1 agree: A + α·mean
])
def test_unknown_models_merge_with_block_weights_from_the_automatic_layout(unknown_files, tmp_path, mode, result):
    a, b, c = unknown_files
    recipe = Recipe(model_a=a, model_b=b, model_c=c if mode != "weight_sum" else None, mode=mode,
                    weights_alpha=BLOCK_WEIGHTS, beta=1.0)
    out = tmp_path / "out.safetensors"
    merge_to_file(recipe, out)
    tensors = merged(out)
    for key, alpha in EXPECTED_ALPHA.items():
        assert torch.equal(tensors[key], torch.full((2, 2), result(alpha))), key
    assert torch.equal(tensors["net.step"], torch.tensor([7]))  # integers are copied from A, never blended


def test_unknown_merge_records_the_key_fingerprint_and_a_replay_checks_it(unknown_files, tmp_path):
    a, b, _ = unknown_files
    out = tmp_path / "out.safetensors"
    merge_to_file(Recipe(model_a=a, model_b=b, alpha=0.25), out)
    with open_checkpoint(out) as ckpt:
        recipe, _ = stored_recipe(ckpt.metadata)
        architecture = json.loads(ckpt.metadata["supermerger_recipe"])["architecture"]
    fingerprint = key_fingerprint({k: tuple(t.shape) for k, t in unknown_model(1.0).items()})
    assert recipe.key_fingerprint == f"{fingerprint},{fingerprint}"
    assert architecture == "unknown (16 keys, prefix net.)"
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, unknown_model(3.0, extra={"net.extra.weight": torch.ones(2)}))
    replay = recipe.with_changes(model_a=a, model_b=str(other))
    with pytest.raises(ArchitectureError, match=r"other\.safetensors differ from the recorded key fingerprint"):
        merge_to_file(replay, tmp_path / "replay.safetensors")
    merge_to_file(recipe.with_changes(model_a=a, model_b=b), tmp_path / "replay.safetensors")  # same files: fine


def test_unknown_models_with_a_missing_key_and_a_different_shape(unknown_files, tmp_path):
    a, _, _ = unknown_files
    b = tmp_path / "b2.safetensors"
    tensors = unknown_model(3.0)
    del tensors["net.pos"]
    tensors["net.head.weight"] = torch.ones(3, 3)
    save_checkpoint(b, tensors)
    with pytest.raises(ArchitectureError, match=r"'net\.head\.weight' has shape \[2, 2\] in model A .* but \[3, 3\]"):
        merge_to_file(Recipe(model_a=a, model_b=str(b)), tmp_path / "out.safetensors")
    del tensors["net.head.weight"]
    b = tmp_path / "b3.safetensors"
    save_checkpoint(b, tensors)
    result = merge_to_file(Recipe(model_a=a, model_b=str(b)), tmp_path / "out.safetensors")
    # named, for the CLI to report
    assert set(result.plan.missing) == {("net.pos", "b3.safetensors"), ("net.head.weight", "b3.safetensors")}
    out = merged(tmp_path / "out.safetensors")
    assert torch.equal(out["net.pos"], torch.ones(2, 2)) and torch.equal(out["net.head.weight"], torch.ones(2, 2))
    assert torch.equal(out["net.blocks.0.mlp.weight"], torch.full((2, 2), 2.0))


def test_elemental_and_include_exclude_on_an_unknown_model(unknown_files, tmp_path):
    a, b, _ = unknown_files
    out = tmp_path / "out.safetensors"
    merge_to_file(Recipe(model_a=a, model_b=b, alpha=0.5, elemental="B02:attn:1", include_exclude="exclude",
                         include_exclude_blocks="B03"), out)
    tensors = merged(out)
    assert torch.equal(tensors["net.blocks.2.attn.q.weight"], torch.full((2, 2), 3.0))  # elemental: ratio 1
    assert torch.equal(tensors["net.blocks.2.mlp.weight"], torch.full((2, 2), 2.0))  # block ratio 0.5
    assert torch.equal(tensors["net.blocks.3.mlp.weight"], torch.full((2, 2), 1.0))  # excluded: A


# Layout files -------------------------------------------------------------------------------------

QWEN_BY_HALVES = {
    "layouts": [{"name": "qwen_image", "label": "Qwen-Image (halves)", "blocks": ["IN", "FRONT", "BACK", "OUT"],
                 "rules": [{"match": "^transformer_blocks\\.([0-9]|[12][0-9])\\.", "block": "FRONT"},
                           {"match": "^transformer_blocks\\.", "block": "BACK"},
                           {"match": "^(norm_out|proj_out)\\.", "block": "OUT"}],
                 "default": "IN"}],
}


def test_a_user_layout_file_changes_the_blocks_of_a_model(tmp_path, monkeypatch):
    folder = tmp_path / "layouts"
    folder.mkdir()
    (folder / "qwen_halves.json").write_text(json.dumps(QWEN_BY_HALVES), encoding="utf-8")
    monkeypatch.setenv("SUPERMERGER_LAYOUTS", str(folder))
    arch = detect_architecture(ARCH_KEYS["qwen_image"]())
    assert arch.family == "qwen_image" and block_ids(arch.layout) == ("IN", "FRONT", "BACK", "OUT")
    assert [block_of(f"transformer_blocks.{n}.attn.to_q.weight", arch.layout) for n in (0, 29, 30, 59)] \
        == ["FRONT", "FRONT", "BACK", "BACK"]
    assert parse_weights("ALL:0, BACK:1", arch.layout).values == (0, 0, 1, 0)


def test_a_user_file_adds_an_architecture_detected_before_the_shipped_ones(tmp_path, monkeypatch):
    folder = tmp_path / "layouts"
    folder.mkdir()
    mine = {"layouts": [{"name": "mine", "blocks": ["IN", "B00-B03", "OUT"],
                         "rules": [{"match": "^net\\.blocks\\.(?P<n>\\d+)\\.", "block": "B{n:02d}"},
                                   {"match": "head", "block": "OUT"}], "default": "IN"}],
            "architectures": [{"name": "mine", "label": "My DiT", "layout": "mine",
                               "detect": [{"all": ["^net\\.blocks\\.0\\."]}]}]}
    (folder / "mine.json").write_text(json.dumps(mine), encoding="utf-8")
    monkeypatch.setenv("SUPERMERGER_LAYOUTS", str(folder))
    shapes = {key: tuple(t.shape) for key, t in unknown_model(1.0).items()}
    arch = detect_architecture(shapes)
    assert (arch.family, arch.label, arch.layout) == ("mine", "My DiT", "mine")
    assert block_of("net.blocks.2.mlp.weight", "mine") == "B02"


@pytest.mark.parametrize("content,message", [
    ("{not json", r"bad\.json: not valid JSON"),
    ('{"layouts": [{"name": "x", "blocks": ["IN"], "rulez": []}]}', r"layouts\[0\]: unknown field 'rulez'; did you mean 'rules'\?"),
    ('{"layouts": [{"name": "x", "blocks": ["IN", "D00-D02", "D01"]}]}', r"layout 'x': blocks D01 are listed twice"),
    ('{"layouts": [{"name": "x", "blocks": ["IN"], "rules": [{"match": "(", "block": "IN"}]}]}',
     r"layout 'x': rules\[0\]: match '\(' is not a valid regular expression"),
    ('{"layouts": [{"name": "x", "blocks": ["IN"], "rules": [{"match": "a", "block": "D{n:02d}"}]}]}',
     r"rules\[0\]: block 'D\{n:02d\}' does not fit match 'a' \(named groups: none\)"),
    ('{"layouts": [{"name": "x", "blocks": ["D05-D01"]}]}', r"block range 'D05-D01' must be like 'D00-D18'"),
    ('{"architectures": [{"name": "y", "layout": "nowhere", "detect": [{"all": ["a"]}]}]}',
     r"architecture 'y': layout 'nowhere' is not defined in any layout file"),
    ('{"architectures": [{"name": "y", "layout": "sd1", "detect": [{}]}]}', r"detect\[0\]: a detect rule needs 'all'"),
    ('{"layouts": [{"name": "Bad Name", "blocks": ["IN"]}]}', r"name 'Bad Name' must be lower-case"),
    ('[]', r"expected an object with 'layouts' and/or 'architectures'"),
])
def test_a_malformed_layout_file_is_refused_with_a_message(tmp_path, monkeypatch, content, message):
    folder = tmp_path / "layouts"
    folder.mkdir()
    (folder / "bad.json").write_text(content, encoding="utf-8")
    monkeypatch.setenv("SUPERMERGER_LAYOUTS", str(folder))
    with pytest.raises(LayoutFileError, match=message) as error:
        registry()
    assert "bad.json" in str(error.value)


def test_shipped_layouts_reproduce_the_original_ids():
    assert block_ids("sd1")[:3] == ("BASE", "IN00", "IN01") and len(block_ids("sd1")) == 26
    assert len(block_ids("sdxl")) == 20 and len(layout_named("sdxl").fine_blocks) == 110
    assert layout_named("flux").shape_text == "CLIP, T5, IN, D00…D18, S00…S37, OUT"


def test_architecture_values_know_the_registry():
    assert Architecture("qwen_image").layout == "qwen_image"
    with pytest.raises(ArchitectureError, match="an unknown architecture needs its automatic layout"):
        Architecture("unknown")


def test_cosine_statistics_read_the_bare_keys_of_an_unknown_model(unknown_files):
    from mergers.merge import open_sources
    from mergers.plan import plan_merge

    a, b, _ = unknown_files
    recipe = Recipe(model_a=a, model_b=b, calcmode="cosineA")
    with open_sources(recipe) as sources:
        plan = plan_merge(recipe, sources)
    assert len(plan.prepass_keys) == 15  # every float key; the int64 counter is left out


def test_info_names_the_blocks_of_any_model(unknown_files):
    from mergers.cli import checkpoint_info

    with open_checkpoint(unknown_files[0]) as ckpt:
        info = checkpoint_info(ckpt)
    assert info["architecture"] == "unknown (16 keys, prefix net.)"
    assert info["blocks"] == "auto:net.blocks=4: IN, B00…B03, OUT"


def test_the_lora_tools_say_which_architectures_they_support():
    from mergers.arch.detect import require_lora_support

    require_lora_support(Architecture("flux"), source="flux.safetensors")
    with pytest.raises(ArchitectureError, match=r"wan\.safetensors: the LoRA tools support .*SDXL base.*; "
                                                r"Wan 2\.1/2\.2 14B is not one of them"):
        require_lora_support(Architecture("wan"), source="wan.safetensors")


def test_the_cli_merges_an_unknown_model_and_names_the_keys_it_kept(unknown_files, tmp_path, capsys):
    from mergers.cli import main

    a, _, _ = unknown_files
    b = tmp_path / "b_short.safetensors"
    tensors = unknown_model(3.0)
    del tensors["net.blocks.2.mlp.weight"]
    save_checkpoint(b, tensors)
    assert main(["merge", a, str(b), "-o", str(tmp_path / "ab.safetensors"), "--weights-alpha", "ALL:0.5, B02:1"]) == 0
    printed = capsys.readouterr().out
    assert "Weight sum (A·(1−α) + B·α) of unknown (16 keys, prefix net.) models: 14 keys merged, 2 copied" in printed
    assert "kept from model A, missing in another model: net.blocks.2.mlp.weight (b_short.safetensors)" in printed
    assert "alpha by block: IN:0.5, B00-B01:0.5, B02:1, B03-OUT:0.5" in printed


def test_a_broken_user_layout_file_does_not_stop_the_package_from_importing(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "layouts"
    folder.mkdir()
    (folder / "broken.json").write_text("{broken", encoding="utf-8")
    code = ("import mergers.cli, mergers.ui.handlers\n"
            "from mergers.arch import detect_architecture\n"
            "try:\n    detect_architecture({'a.weight': (1,)})\n"
            "except Exception as error:\n    print(type(error).__name__, error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, "SUPERMERGER_LAYOUTS": str(folder)}, check=True)
    assert done.stdout.startswith("LayoutFileError ") and "broken.json: not valid JSON" in done.stdout


def test_analyze_compares_an_unknown_model_block_by_block(unknown_files):
    from mergers.analysis.compare import compare_models

    a, b, _ = unknown_files
    comparison = compare_models(a, b)
    assert comparison.architecture == "unknown (16 keys, prefix net.)" and comparison.layout == "auto:net.blocks=4"
    keys_per_block = {row["name"]: row["keys"] for row in comparison.blocks if row["keys"]}
    assert keys_per_block == {"IN": 2, "B00": 3, "B01": 3, "B02": 3, "B03": 3, "OUT": 1}
    assert comparison.skipped == (("net.step", "not floating point (int64)"),)
