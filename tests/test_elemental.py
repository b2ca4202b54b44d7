"""Tests for mergers.elemental: the original's examples key by key on real key lists, errors, round trip."""

import pytest

from mergers.arch import SDXL_FINE_BLOCKS, block_ids, block_of, fine_block_of_sdxl, key_specs
from mergers.elemental import ElementalRule, elemental_ratio, format_elemental, parse_elemental, uses_random
from mergers.errors import WeightsError

BASE_RATIO = 0.25
DOC_EXAMPLES = (
    "OUT03 OUT04 OUT05:attn2 attn1.to_out:0.5",
    "NOT OUT04:attn:1",
    "OUT05:NOT attn proj:0.2",
)

# ---------------------------------------------------------------------------------------------
# Reference: the original's elementals (mergers.py l.952-973) and blocker (l.1440-1456) restated
# step by step: the flag passes through the NOT-blocks test, the empty-blocks escape and the
# NOT-elements test. ``name`` is the key's block as the original should see it (for SDXL, its
# real block; the original's SD1-table lookup is issue #468).


def reference_blocker(text, table):
    out = []
    for word in text.split(" "):
        if "-" in word:
            first, last = sorted(table.index(part.strip()) for part in word.split("-"))
            out.extend(table[first : last + 1])
        elif word or not out:
            out.append(word)
    return " ".join(out)


def reference_ratio(text, key, name, ratio, table):
    for entry in text.replace("\n", ",").split(","):
        if entry.count(":") != 2:
            continue
        blocks, elements, value = entry.strip().split(":")
        blocks = reference_blocker(blocks, table).split(" ")
        elements = elements.split(" ")
        blocks_not, blocks = (True, blocks[1:]) if blocks[0] == "NOT" else (False, blocks)
        elements_not, elements = (True, elements[1:]) if elements[0] == "NOT" else (False, elements)
        flag = blocks_not
        for block in blocks:
            if block == name:
                flag = not blocks_not
        if flag or blocks == [""]:
            flag = elements_not
        else:
            continue
        for element in elements:
            if element in key:
                flag = not elements_not
        if flag:
            ratio = float(value)
    return ratio


def merged_keys(family, layout):
    """(key, block, fine block) of every key that reaches the original's elemental step."""
    rows = []
    for spec in key_specs(family):
        block = block_of(spec.key, layout)
        if "model" in spec.key and ("weight" in spec.key or "bias" in spec.key) and block is not None:
            rows.append((spec.key, block, fine_block_of_sdxl(spec.key) if layout == "sdxl" else None))
    return rows


SD1_KEYS = merged_keys("sd1", "sd1")
SDXL_KEYS = merged_keys("sdxl", "sdxl")


def ratios(text, rows, layout, *, extended=False):
    rules = parse_elemental(text, layout, extended=extended)
    return {key: elemental_ratio(rules, key, block, BASE_RATIO, fine_block=fine) for key, block, fine in rows}


def reference_ratios(text, rows, table, *, extended=False):
    return {
        key: reference_ratio(text, key, fine if extended else block, BASE_RATIO, table) for key, block, fine in rows
    }


# --- the original's examples, key by key on SD1.5 ----------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        *DOC_EXAMPLES,
        "\n".join(DOC_EXAMPLES),
        ",".join(DOC_EXAMPLES),
        "OUT06:attn:0.5,OUT06:attn2.to_k:0.2",
        "IN00-IN05:ff.net:0.7\nIN05-IN00:NOT ff:0.1",
        "::0.9",
        "OUT05::0.3",
        "NOT OUT04 M00::0.6",
        "BASE:NOT text_model:0.4",
        "OUT11:NOT out.:0.35,M00:attn1 attn2:0.45",
    ],
)
def test_sd1_matches_the_original_logic_key_by_key(text):
    got = ratios(text, SD1_KEYS, "sd1")
    assert got == reference_ratios(text, SD1_KEYS, list(block_ids("sd1")))
    assert any(ratio != BASE_RATIO for ratio in got.values())


def test_doc_examples_known_answers():
    rules = parse_elemental("\n".join(DOC_EXAMPLES), "sd1")
    out4 = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0."
    out5 = "model.diffusion_model.output_blocks.5."
    cases = {
        (out4 + "attn2.to_k.weight", "OUT04"): 0.5,  # first rule; OUT04 is excluded from the second
        (out4 + "attn1.to_q.weight", "OUT04"): BASE_RATIO,
        (out4 + "attn1.to_out.0.bias", "OUT04"): 0.5,
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "IN01"): 1.0,
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", "BASE"): 1.0,
        (out5 + "0.in_layers.2.weight", "OUT05"): 0.2,  # neither attn nor proj
        (out5 + "1.proj_in.weight", "OUT05"): BASE_RATIO,
        (out5 + "1.transformer_blocks.0.attn2.to_v.weight", "OUT05"): 1.0,  # NOT OUT04:attn wins over OUT05 rule 1
        (out5 + "1.transformer_blocks.0.norm1.bias", "OUT05"): 0.2,
    }
    for (key, block), expected in cases.items():
        assert elemental_ratio(rules, key, block, BASE_RATIO) == expected, key


def test_later_entries_win():
    rules = parse_elemental("OUT06:attn:0.5,OUT06:attn2.to_k:0.2", "sd1")
    prefix = "model.diffusion_model.output_blocks.6.1.transformer_blocks.0."
    assert elemental_ratio(rules, prefix + "attn2.to_k.weight", "OUT06", 1.0) == 0.2
    assert elemental_ratio(rules, prefix + "attn2.to_q.weight", "OUT06", 1.0) == 0.5
    assert elemental_ratio(rules, prefix + "ff.net.2.weight", "OUT06", 1.0) == 1.0


def test_empty_and_bare_not_mean_everything():
    # An empty list, or a bare NOT (which negates nothing), takes every block / every key.
    for text in ("::0.5", "NOT::0.5", ":NOT:0.5", "NOT:NOT:0.5"):
        rule = parse_elemental(text, "sd1")[0]
        assert elemental_ratio((rule,), "anything.weight", "IN03", 1.0) == 0.5, text


# --- ranges ------------------------------------------------------------------------------------


def test_ranges_expand_in_layout_order_either_way():
    forward = parse_elemental("IN00-IN02:attn:1", "sd1")[0]
    backward = parse_elemental("IN02-IN00:attn:1", "sd1")[0]
    assert forward.blocks == backward.blocks == ("IN00", "IN01", "IN02")
    assert parse_elemental("IN07-OUT01 BASE:x:1", "sdxl")[0].blocks == ("IN07", "IN08", "M00", "OUT00", "OUT01", "BASE")


def test_block_names_are_case_insensitive_and_mid_is_m00():
    assert parse_elemental("out05 mid:attn:1", "sd1")[0].blocks == ("OUT05", "M00")
    assert parse_elemental("not in00::1", "sd1")[0].blocks_negated


# --- SDXL: real block names (issue #468 fixed) and extended names -------------------------------


def test_sdxl_m00_hits_the_middle_block():
    got = ratios("M00:attn2:0.3", SDXL_KEYS, "sdxl")
    hits = {key for key, ratio in got.items() if ratio == 0.3}
    expected = {key for key, _, _ in SDXL_KEYS if ".middle_block." in key and "attn2" in key}
    assert hits == expected and len(hits) > 0
    # The original's bug looks the name up in the SD1 table: M00 (index 10 of 20) becomes IN09.
    assert block_ids("sd1")[block_ids("sdxl").index("M00")] == "IN09"


@pytest.mark.parametrize(
    "text",
    ["M00:attn2:0.3", "OUT08:NOT attn:0.7", "NOT IN00-IN08:ff:0.1", "BASE:embedders.1:0.9\nIN00:label_emb:0.6"],
)
def test_sdxl_matches_the_original_logic_with_real_blocks(text):
    got = ratios(text, SDXL_KEYS, "sdxl")
    assert got == reference_ratios(text, SDXL_KEYS, list(block_ids("sdxl")))
    assert any(ratio != BASE_RATIO for ratio in got.values())


@pytest.mark.parametrize(
    "text",
    ["IN411:attn1:0.7", "IN410-IN511::0.2", "NOT MID100-MID109:attn:0.4", "CLIPG VAE TIME::0.8", "OUT9::0.1"],
)
def test_extended_names_match_fine_blocks(text):
    got = ratios(text, SDXL_KEYS, "sdxl", extended=True)
    assert got == reference_ratios(text, SDXL_KEYS, list(SDXL_FINE_BLOCKS), extended=True)
    assert any(ratio != BASE_RATIO for ratio in got.values())


def test_extended_known_answer():
    got = ratios("IN411:attn1:0.7", SDXL_KEYS, "sdxl", extended=True)
    hits = {key for key, ratio in got.items() if ratio == 0.7}
    assert hits == {key for key, _, _ in SDXL_KEYS if ".input_blocks.4.1.transformer_blocks.1.attn1." in key}
    assert len(hits) == 5  # to_q, to_k, to_v, to_out.0 weight and bias


def test_extended_rule_needs_the_fine_block():
    rules = parse_elemental("IN411::0.7", "sdxl", extended=True)
    with pytest.raises(WeightsError, match="fine block"):
        elemental_ratio(rules, "model.diffusion_model.input_blocks.4.1.proj_in.weight", "IN04", 1.0)


# --- random ratios -----------------------------------------------------------------------------


def test_random_ratios_call_draw():
    rules = parse_elemental("OUT05:attn:R, OUT05:attn2:u, OUT05:ff.net:X", "sd1")
    assert [rule.ratio for rule in rules] == ["R", "U", "X"] and uses_random(rules)
    drawn = []

    def draw(letter):
        drawn.append(letter)
        return {"R": 0.1, "U": -0.3, "X": 0.7}[letter]

    prefix = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0."
    assert elemental_ratio(rules, prefix + "attn1.to_q.weight", "OUT05", 1.0, draw=draw) == 0.1
    assert elemental_ratio(rules, prefix + "attn2.to_q.weight", "OUT05", 1.0, draw=draw) == -0.3
    assert elemental_ratio(rules, prefix + "ff.net.2.bias", "OUT05", 1.0, draw=draw) == 0.7
    assert elemental_ratio(rules, prefix + "norm1.bias", "OUT05", 1.0, draw=draw) == 1.0
    assert drawn == ["R", "U", "X"]  # once per key, only for the winning rule


def test_random_without_draw_is_an_error():
    rules = parse_elemental("OUT05:attn:R", "sd1")
    assert elemental_ratio(rules, "x.ff.weight", "OUT05", 1.0) == 1.0  # no match, no dice needed
    with pytest.raises(WeightsError, match="random"):
        elemental_ratio(rules, "x.attn1.weight", "OUT05", 1.0)
    assert not uses_random(parse_elemental("OUT05:attn:1", "sd1"))


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "layout", "extended", "message"),
    [
        ("OUT05:attn", "sd1", False, "'OUT05:attn' is not Blocks:Elements:Ratio"),
        ("OUT05:attn:0.5:1", "sd1", False, "exactly 2 colons"),
        ("OUT12:attn:0.5", "sd1", False, "unknown block 'OUT12'"),
        ("IN10:attn:0.5", "sdxl", False, "unknown block 'IN10'.*OUT08"),
        ("IN411:attn:0.5", "sdxl", False, "unknown block 'IN411'"),
        ("IN04:attn:0.5", "sdxl", True, "unknown block 'IN04'.*IN411"),
        ("IN411:attn:0.5", "sd1", True, "SDXL only"),
        ("OUT05:attn:half", "sd1", False, "ratio 'half'"),
        ("OUT05:attn:", "sd1", False, "ratio ''"),
        ("OUT05:attn:nan", "sd1", False, "not a finite number"),
        ("OUT05:attn:RU", "sd1", False, "ratio 'RU'"),
        ("IN00-IN01-IN02:attn:1", "sd1", False, "range 'IN00-IN01-IN02'"),
        ("IN00-:attn:1", "sd1", False, "unknown block ''"),
        ("NOT OUT05 NOT:attn:1", "sd1", False, "unknown block 'NOT'"),
        ("OUT05::1", "sd4", False, "unknown layout"),
    ],
)
def test_errors_name_the_entry(text, layout, extended, message):
    with pytest.raises(WeightsError, match=message):
        parse_elemental(f"IN00::1, {text}", layout, extended=extended)


def test_blank_entries_are_skipped():
    assert parse_elemental(" ,\n, OUT05::1,,\n", "sd1") == parse_elemental("OUT05::1", "sd1")
    assert parse_elemental("", "sdxl") == ()


# --- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "layout", "extended"),
    [
        ("\n".join(DOC_EXAMPLES), "sd1", False),
        ("IN00-IN03 OUT11:ff.net attn1:-0.125, NOT::R, :NOT:0.333333333333", "sd1", False),
        ("NOT M00:NOT attn2.to_k:1e-7\nOUT08::u", "sdxl", False),
        ("IN410-IN511 VAE:attn:2", "sdxl", True),
    ],
)
def test_format_round_trip(text, layout, extended):
    rules = parse_elemental(text, layout, extended=extended)
    assert parse_elemental(format_elemental(rules), layout, extended=extended) == rules


def test_format_known_text():
    rules = parse_elemental(" not  in00-in02 : NOT attn  proj : 0.50 \n ::r", "sd1")
    assert format_elemental(rules) == "NOT IN00 IN01 IN02:NOT attn proj:0.5, ::R"
    assert rules[0] == ElementalRule(("IN00", "IN01", "IN02"), True, ("attn", "proj"), True, 0.5)
