"""Tests for mergers.arch: real key lists, architecture detection, support checks."""

import json
from pathlib import Path

import pytest

from mergers.arch import LAYOUTS, Architecture, KeySpec, detect_architecture, key_specs, require_supported
from mergers.errors import ArchitectureError

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
REPO = Path(__file__).resolve().parents[1]
# The JSON key lists the data files were made from, where this checkout has them.
SHARED_ARCH = next((p for p in (REPO / "shared" / "arch", REPO.parent / "shared" / "arch") if p.is_dir()), None)


def real_shapes(family, *, optional=False):
    """key -> shape of a real ``family`` checkpoint, without the optional keys unless asked."""
    return {spec.key: spec.shape for spec in key_specs(family) if optional or not spec.optional}


def scaled_down(shapes, factor=32):
    """The same keys with every dimension over 9 divided down, as the tests' tiny models have."""
    return {key: tuple(n if n <= 9 else max(10, n // factor) for n in shape) for key, shape in shapes.items()}


def unet_only(shapes):
    return {key: shape for key, shape in shapes.items() if key.startswith("model.diffusion_model.")}


def with_input_channels(shapes, channels):
    out_channels, _, *kernel = shapes[INPUT_CONV]
    return {**shapes, INPUT_CONV: (out_channels, channels, *kernel)}


def refiner_shapes():
    """A plausible SDXL refiner: OpenCLIP bigG alone as embedders.0, 4-level U-Net with label_emb, width 1280."""
    shapes = {
        "conditioner.embedders.0.model.ln_final.weight": (1280,),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
        "model.diffusion_model.time_embed.0.weight": (1536, 384),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        INPUT_CONV: (384, 4, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 384, 3, 3),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for layer in range(32):
        prefix = f"conditioner.embedders.0.model.transformer.resblocks.{layer}."
        shapes[prefix + "attn.in_proj_weight"] = (3840, 1280)
        shapes[prefix + "mlp.c_proj.weight"] = (1280, 5120)
    for block, width in ((4, 768), (5, 768), (7, 1536), (8, 1536)):
        prefix = f"model.diffusion_model.input_blocks.{block}.1."
        shapes[prefix + "proj_in.weight"] = (width, width)
        for t in range(4):
            shapes[prefix + f"transformer_blocks.{t}.attn2.to_k.weight"] = (width, 1280)
    for block in range(1, 12):
        shapes[f"model.diffusion_model.input_blocks.{block}.0.in_layers.2.weight"] = (384, 384, 3, 3)
    return shapes


# ---------------------------------------------------------------------------------------------
# Key lists


@pytest.mark.parametrize("family,count,required", [("sd1", 1831, 1130), ("sd2", 1228, 1228), ("sdxl", 2531, 2480)])
def test_key_specs_hold_every_real_key(family, count, required):
    specs = key_specs(family)
    assert len(specs) == len({spec.key for spec in specs}) == count
    assert sum(not spec.optional for spec in specs) == required
    assert all(isinstance(spec, KeySpec) and all(isinstance(n, int) for n in spec.shape) for spec in specs)


def test_key_specs_fields_and_cache():
    first = key_specs("sd1")[0]
    assert first == KeySpec(
        key="cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", shape=(77, 768),
        dtype="float32", component="clip_l",
        aliases=("cond_stage_model.transformer.embeddings.position_embedding.weight",))
    by_key = {spec.key: spec for spec in key_specs("sd1")}
    assert by_key["model_ema.num_updates"] == KeySpec("model_ema.num_updates", (), "int32", "ema", optional=True)
    assert by_key[INPUT_CONV].shape == (320, 4, 3, 3)
    assert key_specs("sdxl") is key_specs("sdxl")


@pytest.mark.skipif(SHARED_ARCH is None, reason="shared/arch JSON key lists not in this checkout")
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3", "flux"])
def test_key_specs_match_the_json_they_came_from(family):
    entries = json.loads((SHARED_ARCH / f"{family}.json").read_text(encoding="utf-8"))["keys"]
    expected = [KeySpec(e["key"], tuple(e["shape"]), e["dtype"], e["component"], e.get("optional", False),
                        tuple(e.get("aliases", ()))) for e in entries]
    assert list(key_specs(family)) == expected


@pytest.mark.parametrize("family", ["sd35_large", "sdxl_refiner", "SD1"])
def test_key_specs_of_other_families_raise(family):
    with pytest.raises(ArchitectureError, match=family):
        key_specs(family)


# ---------------------------------------------------------------------------------------------
# Detection on real and scaled-down key lists


@pytest.mark.parametrize("family,prediction", [("sd1", "eps"), ("sd2", "unknown"), ("sdxl", "eps")])
@pytest.mark.parametrize("make", [real_shapes, lambda f: scaled_down(real_shapes(f)),
                                  lambda f: scaled_down(real_shapes(f), 320)], ids=["real", "tiny", "tinier"])
def test_real_key_lists(family, prediction, make):
    assert detect_architecture(make(family), source="x.safetensors") == Architecture(family, "normal", prediction)


@pytest.mark.parametrize("family,label", [("sd1", "SD1.x"), ("sd2", "SD2.x"), ("sdxl", "SDXL base (v-prediction)")])
def test_real_key_lists_with_optional_keys(family, label):
    # The SDXL list includes the "v_pred" marker that v-prediction finetunes carry.
    assert detect_architecture(real_shapes(family, optional=True)).label == label


def test_sd1_old_text_encoder_spelling():
    shapes = {alias: spec.shape for spec in key_specs("sd1") for alias in spec.aliases}
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in shapes
    assert detect_architecture(shapes).family == "sd1"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("channels,variant", [(9, "inpainting"), (8, "instruct-pix2pix"), (4, "normal")])
def test_variants_from_input_channels(family, channels, variant):
    for shapes in (real_shapes(family), scaled_down(real_shapes(family))):
        assert detect_architecture(with_input_channels(shapes, channels)).variant == variant


def test_refiner():
    arch = detect_architecture(refiner_shapes())
    assert arch == Architecture("sdxl_refiner")
    assert (arch.layout, arch.label, arch.supported) == ("sd1", "SDXL refiner", True)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_only_files(family):
    assert detect_architecture(unet_only(real_shapes(family))).family == family  # by context width
    assert detect_architecture(unet_only(scaled_down(real_shapes(family)))).family == family  # by structure


def test_unet_only_refiner():
    assert detect_architecture(unet_only(refiner_shapes())).family == "sdxl_refiner"
    assert detect_architecture(unet_only(scaled_down(refiner_shapes()))).family == "sdxl_refiner"


def test_keys_win_over_context_width():
    # Tiny SD1 files can have any width; a width that happens to equal SDXL's must not matter.
    shapes = {key: ((shape[0], 2048) if key.endswith("attn2.to_k.weight") else shape)
              for key, shape in scaled_down(real_shapes("sd1")).items()}
    assert detect_architecture(shapes).family == "sd1"


def test_original_sdxl_marker_alone_is_sdxl():
    marker = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.weight"
    assert detect_architecture({marker: (1280, 5120)}).family == "sdxl"


# ---------------------------------------------------------------------------------------------
# Prediction type


@pytest.mark.parametrize("metadata,expected", [
    ({"modelspec.prediction_type": "v"}, "v"),
    ({"modelspec.prediction_type": "v_prediction"}, "v"),
    ({"modelspec.prediction_type": "epsilon"}, "eps"),
    ({"modelspec.prediction_type": "eps"}, "eps"),
    ({"modelspec.title": "something"}, "unknown"),
    (None, "unknown"),
])
def test_sd2_prediction_from_metadata(metadata, expected):
    assert detect_architecture(real_shapes("sd2"), metadata).prediction == expected


def test_v_pred_key_means_v():
    assert detect_architecture({**real_shapes("sd2"), "v_pred": ()}).label == "SD2.x (v-prediction)"
    assert detect_architecture({**real_shapes("sdxl"), "v_pred": ()}).prediction == "v"
    assert detect_architecture(real_shapes("sdxl"), {"modelspec.prediction_type": "epsilon"}).prediction == "eps"


def test_sd1_is_eps_by_default():
    assert detect_architecture(real_shapes("sd1"), {"modelspec.title": "x"}).prediction == "eps"


# ---------------------------------------------------------------------------------------------
# SD3, Flux, unknown files


SD3_SHAPES = {
    "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536),
    "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": (1280,),
    "first_stage_model.decoder.conv_in.bias": (512,),
}
FLUX_SHAPES = {
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "single_blocks.0.linear1.weight": (21504, 3072),
    "vae.decoder.conv_in.bias": (512,),
}


@pytest.mark.parametrize("shapes,family,label", [(SD3_SHAPES, "sd3", "SD3"), (FLUX_SHAPES, "flux", "Flux")])
def test_sd3_and_flux_are_recognised_and_supported(shapes, family, label):
    arch = detect_architecture(shapes, source="big.safetensors")
    assert (arch.family, arch.layout, arch.label, arch.supported) == (family, family, label, True)
    require_supported(arch, source="big.safetensors")


@pytest.mark.skipif(SHARED_ARCH is None, reason="shared/arch JSON key lists not in this checkout")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_real_sd3_and_flux_key_lists(family):
    entries = json.loads((SHARED_ARCH / f"{family}.json").read_text(encoding="utf-8"))["keys"]
    assert detect_architecture({e["key"]: e["shape"] for e in entries}).family == family
    bare = {alias: e["shape"] for e in entries for alias in e.get("aliases", ())}
    if bare:
        assert detect_architecture(bare).family == family


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "sd35_large", "flux"])
def test_supported_families_pass(family):
    require_supported(Architecture(family), source="ok.safetensors")
    assert Architecture(family).layout in LAYOUTS


def test_unknown_file_is_an_unknown_architecture_with_its_keys_in_the_label():
    # Issue #17: a file no rule recognises merges key by key instead of being refused.
    shapes = {"first_stage_model.decoder.conv_in.bias": (512,), "foo.weight": (3,)}
    arch = detect_architecture(shapes, source="vae.safetensors")
    assert (arch.family, arch.known, arch.supported) == ("unknown", False, True)
    assert arch.label == "unknown (2 keys, prefix first_stage_model., foo.)"
    assert arch.layout == "auto:VAE"


def test_empty_file():
    with pytest.raises(ArchitectureError, match="empty.safetensors: holds no tensors"):
        detect_architecture({}, source="empty.safetensors")


def test_unet_without_attention_is_unknown():
    arch = detect_architecture({INPUT_CONV: (10, 4, 3, 3)}, source="odd.safetensors")
    assert arch.family == "unknown" and arch.label == "unknown (1 key, prefix model.diffusion_model.input_blocks.0.0.)"


# ---------------------------------------------------------------------------------------------
# The Architecture value


@pytest.mark.parametrize("arch,label", [
    (Architecture("sd1", "inpainting"), "SD1.x inpainting"),
    (Architecture("sd1", "instruct-pix2pix"), "SD1.x instruct-pix2pix"),
    (Architecture("sdxl"), "SDXL base"),
    (Architecture("sd2", prediction="v"), "SD2.x (v-prediction)"),
    (Architecture("sd2", "inpainting", "unknown"), "SD2.x inpainting"),
    (Architecture("sdxl_refiner"), "SDXL refiner"),
])
def test_labels(arch, label):
    assert arch.label == label


@pytest.mark.parametrize("family,layout", [("sd1", "sd1"), ("sd2", "sd1"), ("sdxl", "sdxl"),
                                           ("sdxl_refiner", "sd1"), ("sd3", "sd3"), ("sd35_large", "sd3_large"),
                                           ("flux", "flux")])
def test_layouts(family, layout):
    assert Architecture(family).layout == layout


@pytest.mark.parametrize("kwargs", [{"family": "sd15"}, {"family": "sd1", "variant": "depth"},
                                    {"family": "sd1", "prediction": "flow"}])
def test_invalid_architecture_values(kwargs):
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        Architecture(**kwargs)
