"""Tests for mergers.keyfilter: Include/Exclude key by key on real key lists, errors, zeroed weights."""

import pytest

from mergers.adjust import ADJUST_KEYS
from mergers.arch import block_ids, block_of, fine_block_of_sdxl, key_specs
from mergers.errors import WeightsError
from mergers.keyfilter import (
    FILTER_CHOICES,
    KeyFilter,
    filter_choices,
    filter_match,
    parse_key_filter,
    stays_as_a,
    zeroed_weights,
)

# ---------------------------------------------------------------------------------------------
# Reference: the original's excluder (mergers.py l.1600-1610) and the condition its merge loop
# puts around it (l.444). ``block`` is the fine SDXL name (SD1: the block id), ``block26`` the
# layout block; True means "skip": the key stays as A.
ORIGINAL_FINETUNES = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.bias",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.0.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.out.2.bias",
]


def reference_excluder(block, block26, inex, ex_blocks, ex_elems, key):
    if ex_blocks == [] and ex_elems == [""]:
        return False
    include = inex == "Include"
    if block26 in ex_blocks:
        return not include
    if block in ex_elems or block in ex_blocks:
        return not include
    if "Adjust" in ex_blocks and key in ORIGINAL_FINETUNES:
        return not include
    for element in ex_elems:
        if element != "" and element in key:
            return not include
    if "VAE" in ex_blocks and "first_stage_model" in key:
        return not include
    return include


def reference_skip(inex, ex_blocks, ex_elems_text, key, layout):
    block26 = block_of(key, layout)
    block = fine_block_of_sdxl(key) if layout == "sdxl" else block26
    ex_elems = ex_elems_text.split(",")
    return bool(inex != "Off" and (ex_blocks or ex_elems != [""]) and reference_excluder(
        block, block26, inex, ex_blocks, ex_elems, key))


def merged_keys(family, layout):
    """The keys the original's merge loop reaches when it asks the excluder."""
    keys = []
    for spec in key_specs(family):
        key = spec.key
        if "model" in key and ("weight" in key or "bias" in key) and block_of(key, layout) is not None:
            keys.append(key)
    return keys


SD1_KEYS = merged_keys("sd1", "sd1")
SDXL_KEYS = merged_keys("sdxl", "sdxl")


def kept(f, keys, layout):
    return {
        key for key in keys
        if stays_as_a(f, key, block_of(key, layout), fine_block=fine_block_of_sdxl(key) if layout == "sdxl" else None)
    }


def reference_kept(inex, blocks, elements, keys, layout):
    return {key for key in keys if reference_skip(inex, blocks, elements, key, layout)}


FILTERS = [
    ("Exclude", ["IN04", "OUT11"], ""),
    ("Include", ["IN04", "OUT11"], ""),
    ("Exclude", ["VAE"], ""),
    ("Include", ["VAE", "BASE"], ""),
    ("Exclude", ["Adjust"], ""),
    ("Include", ["Adjust", "M00"], ""),
    ("Exclude", [], "attn2"),
    ("Include", [], "attn2,ff.net"),
    ("Include", ["IN00"], "norm,emb_layers"),
    ("Exclude", ["OUT00", "VAE", "Adjust"], "proj_in,time_embed"),
    ("Off", ["IN04"], "attn"),
    ("Include", [], ""),
    ("Exclude", [], ""),
]


@pytest.mark.parametrize(("inex", "blocks", "elements"), FILTERS)
@pytest.mark.parametrize(("family", "layout", "keys"), [("sd1", "sd1", SD1_KEYS), ("sdxl", "sdxl", SDXL_KEYS)])
def test_matches_the_original_key_by_key(inex, blocks, elements, family, layout, keys):
    f = parse_key_filter(inex, blocks, elements, layout=layout)
    got = kept(f, keys, layout)
    assert got == reference_kept(inex, blocks, elements, keys, layout)
    if inex == "Off" or not (blocks or elements):
        assert got == set()


@pytest.mark.parametrize(("blocks", "elements"), [(["IN411", "MID105"], ""), (["OUT9"], "IN411,OUT219")])
def test_sdxl_fine_names_match_fine_blocks(blocks, elements):
    for inex in ("Include", "Exclude"):
        f = parse_key_filter(inex, blocks, elements, layout="sdxl")
        assert kept(f, SDXL_KEYS, "sdxl") == reference_kept(inex, blocks, elements, SDXL_KEYS, "sdxl")
    f = parse_key_filter("Exclude", ["IN411"], layout="sdxl")
    assert kept(f, SDXL_KEYS, "sdxl") == {k for k in SDXL_KEYS if ".input_blocks.4.1.transformer_blocks.1." in k}


def test_sdxl_out01_means_the_block_only():
    # Departure: the original also matches the fine name OUT01 (output_blocks.0.1 outside its
    # transformer blocks), a different block that happens to share the spelling.
    f = parse_key_filter("Exclude", ["OUT01"], layout="sdxl")
    got = kept(f, SDXL_KEYS, "sdxl")
    original = reference_kept("Exclude", ["OUT01"], "", SDXL_KEYS, "sdxl")
    assert got == {k for k in SDXL_KEYS if ".output_blocks.1." in k}
    assert original - got == {k for k in SDXL_KEYS if fine_block_of_sdxl(k) == "OUT01"}
    assert len(original - got) == 6  # norm, proj_in and proj_out, weight and bias


def test_known_answers():
    vae = parse_key_filter("Exclude", ["VAE"], layout="sd1")
    assert stays_as_a(vae, "first_stage_model.decoder.conv_in.weight", "BASE")
    assert not stays_as_a(vae, "cond_stage_model.transformer.text_model.final_layer_norm.weight", "BASE")
    adjust = parse_key_filter("Include", ["Adjust"], layout="sdxl")
    assert {k for k in SDXL_KEYS if not stays_as_a(adjust, k, block_of(k, "sdxl"),
                                                   fine_block=fine_block_of_sdxl(k))} == set(ADJUST_KEYS)
    only_in04 = parse_key_filter("Include", "IN04", layout="sd1")
    assert stays_as_a(only_in04, "model.diffusion_model.out.0.bias", "OUT11")
    assert not stays_as_a(only_in04, "model.diffusion_model.input_blocks.4.0.skip_connection.bias", "IN04")


def test_elements_are_stripped():
    # Departure: the original keeps the space in "attn2, ff.net", so " ff.net" matches no key.
    f = parse_key_filter("Exclude", (), " attn2 , ff.net,, ", layout="sd1")
    assert f.elements == ("attn2", "ff.net")
    assert stays_as_a(f, "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight", "M00")


def test_filter_match_follows_the_original_order():
    f = KeyFilter("exclude", ("M00", "VAE", "Adjust"), ("attn", "M00"))
    assert filter_match(f, "model.diffusion_model.middle_block.1.proj_in.weight", "M00") == "M00"
    assert filter_match(f, "first_stage_model.decoder.mid.attn_1.q.bias", "BASE") == "attn"
    assert filter_match(f, "first_stage_model.decoder.conv_in.bias", "BASE") == "VAE"
    assert filter_match(f, "model.diffusion_model.out.2.bias", "OUT11") == "Adjust"
    assert filter_match(f, "model.diffusion_model.output_blocks.0.0.in_layers.0.bias", "OUT00") is None
    xl = KeyFilter("include", (), ("IN411",))
    assert filter_match(xl, "x.attn1.to_q.weight", "IN04", fine_block="IN411") == "IN411"


def test_modes():
    assert KeyFilter("Include").mode == "include"
    assert parse_key_filter(" EXCLUDE ", ["IN00"], layout="sd1").mode == "exclude"
    assert not KeyFilter("Off", ("IN00",)).active
    with pytest.raises(WeightsError, match="mode 'Maybe'"):
        KeyFilter("Maybe")


def test_parse_blocks():
    assert parse_key_filter("Exclude", "IN00, OUT11 VAE print", layout="sd1").blocks == ("IN00", "OUT11", "VAE")
    assert parse_key_filter("Exclude", ["print", "Adjust"], layout="sdxl").blocks == ("Adjust",)
    complement = parse_key_filter("Include", "NOT IN00 VAE", layout="sdxl").blocks
    assert complement == tuple(c for c in filter_choices("sdxl") if c not in ("IN00", "VAE"))


@pytest.mark.parametrize(
    ("blocks", "layout", "message"),
    [
        (["IN09"], "sdxl", "unknown include/exclude block 'IN09'.*OUT08"),
        (["IN411"], "sd1", "unknown include/exclude block 'IN411'"),
        ("IN04 vae", "sd1", "block 'vae'"),
        (["OUT12"], "sd1", "OUT12"),
        (["IN00"], "sd4", "unknown layout"),
    ],
)
def test_errors(blocks, layout, message):
    with pytest.raises(WeightsError, match=message):
        parse_key_filter("Exclude", blocks, layout=layout)


def test_choices():
    original = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    assert FILTER_CHOICES == tuple(original + ["Adjust", "VAE"])
    assert filter_choices("sdxl") == block_ids("sdxl") + ("Adjust", "VAE")


# --- zeroed weights ----------------------------------------------------------------------------


def zeroed_ids(f, layout, **kwargs):
    values = zeroed_weights(f, tuple(range(1, len(block_ids(layout)) + 1)), layout, **kwargs)
    return {block for block, value in zip(block_ids(layout), values) if value == 0}


def test_zeroed_weights_known_answers():
    sd1 = "sd1"
    assert zeroed_weights(parse_key_filter("Exclude", ["IN01"], layout=sd1), (0.5,) * 26, sd1) == (
        (0.5, 0.5, 0.0) + (0.5,) * 23)
    assert zeroed_ids(parse_key_filter("Exclude", ["VAE"], layout=sd1), sd1) == {"BASE"}
    assert zeroed_ids(parse_key_filter("Exclude", ["Adjust"], layout=sd1), sd1) == {"IN00", "OUT11"}
    assert zeroed_ids(parse_key_filter("Include", ["OUT05"], layout=sd1), sd1) == set(block_ids(sd1)) - {"OUT05"}
    attn2 = {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(3, 12)}
    assert zeroed_ids(parse_key_filter("Exclude", [], "attn2", layout=sd1), sd1) == attn2
    # EMA copies (model_ema.*) are BASE keys, and their names hold "attn2" too.
    ema = [spec.key for spec in key_specs("sd1")]
    assert zeroed_ids(parse_key_filter("Exclude", [], "attn2", layout=sd1), sd1, keys=ema) == attn2 | {"BASE"}
    assert zeroed_ids(parse_key_filter("Exclude", ["IN411"], layout="sdxl"), "sdxl") == {"IN04"}
    assert zeroed_ids(parse_key_filter("Exclude", ["M00"], layout="sdxl"), "sdxl") == {"M00"}


def test_zeroed_weights_off_or_empty_changes_nothing():
    values = tuple(float(i) for i in range(20))
    assert zeroed_weights(parse_key_filter("Off", ["IN04"], layout="sdxl"), values, "sdxl") == values
    assert zeroed_weights(parse_key_filter("Include", [], layout="sdxl"), values, "sdxl") == values


def test_zeroed_weights_uses_the_given_keys():
    f = parse_key_filter("Include", [], "attn2", layout="sd1")
    keys = ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.input_blocks.2.0.in_layers.0.bias",
            "model.diffusion_model.middle_block.0.emb_layers.1.weight",
            "model.diffusion_model.time_embed.0.position_ids"]  # neither weight nor bias: never merged
    assert zeroed_ids(f, "sd1", keys=keys) == {"IN02", "M00"}


def test_zeroed_weights_wrong_length():
    with pytest.raises(WeightsError, match="20 block weights"):
        zeroed_weights(KeyFilter("exclude", ("IN00",)), (1.0,) * 26, "sdxl")
