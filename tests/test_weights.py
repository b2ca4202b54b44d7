"""Tests for mergers.weights: the three weight-string forms, presets, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergers.arch.layouts import block_ids
from mergers.errors import WeightsError
from mergers.weights import (
    BlockWeights,
    format_number,
    load_presets,
    parse_weights,
    sd1_to_sdxl,
    user_presets_path,
)

SHIPPED_NAMES = [
    "GRAD_V",
    "GRAD_A",
    "FLAT_25",
    "FLAT_75",
    "WRAP08",
    "WRAP12",
    "WRAP14",
    "WRAP16",
    "MID12_50",
    "OUT07",
    "OUT12",
    "OUT12_5",
    "RING08_SOFT",
    "RING08_5",
    "RING10_5",
    "RING10_3",
    "SMOOTHSTEP",
    "REVERSE-SMOOTHSTEP",
    "SMOOTHSTEP*2",
    "R_SMOOTHSTEP*2",
    "SMOOTHSTEP*3",
    "R_SMOOTHSTEP*3",
    "SMOOTHSTEP*4",
    "R_SMOOTHSTEP*4",
    "SMOOTHSTEP/2",
    "R_SMOOTHSTEP/2",
    "SMOOTHSTEP/3",
    "R_SMOOTHSTEP/3",
    "SMOOTHSTEP/4",
    "R_SMOOTHSTEP/4",
    "COSINE",
    "REVERSE_COSINE",
    "TRUE_CUBIC_HERMITE",
    "TRUE_REVERSE_CUBIC_HERMITE",
    "FAKE_CUBIC_HERMITE",
    "FAKE_REVERSE_CUBIC_HERMITE",
    "ALL_A",
    "ALL_B",
]

GRAD_V_SD1 = (
    0.0,
    1.0, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333,
    0.5, 0.4166666667, 0.3333333333, 0.25, 0.1666666667, 0.0833333333,
    0.0,
    0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5,
    0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0,
)  # fmt: skip
# Hand-computed: BASE, IN00..IN08, M00, OUT00..OUT08 of the row above.
GRAD_V_SDXL = (
    0.0,
    1.0, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333,
    0.5, 0.4166666667, 0.3333333333,
    0.0,
    0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5,
    0.5833333333, 0.6666666667, 0.75,
)  # fmt: skip


@pytest.fixture(autouse=True)
def no_user_presets(monkeypatch, tmp_path):
    """Keep the developer's own preset file out of every test."""
    monkeypatch.setenv("SUPERMERGER_PRESETS", str(tmp_path / "absent.tsv"))


def error_of(text, layout, **kwargs):
    with pytest.raises(WeightsError) as caught:
        parse_weights(text, layout, **kwargs)
    return str(caught.value)


# --- presets ---------------------------------------------------------------


def test_shipped_presets_are_the_originals():
    presets = load_presets()
    assert list(presets) == SHIPPED_NAMES
    assert all(len(values.split(",")) == 26 for values in presets.values())


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_every_shipped_preset_parses_for_both_layouts(name):
    literal = tuple(float(v) for v in load_presets()[name].split(","))
    assert parse_weights(name, "sd1").values == literal
    assert parse_weights(name, "sdxl").values == tuple(sd1_to_sdxl(literal))


def test_preset_spot_checks():
    assert parse_weights("GRAD_V", "sd1").values == GRAD_V_SD1
    assert parse_weights("GRAD_V", "sdxl").values == GRAD_V_SDXL
    assert parse_weights("ALL_B", "sd1").values == (1.0,) * 26
    assert parse_weights("ALL_A", "sdxl").values == (0.0,) * 20
    assert parse_weights("OUT12_5", "sd1").value_of("M00") == 0.5
    assert parse_weights("SMOOTHSTEP/3", "sd1").values[:4] == (0.0, 0.0, 0.04296875, 0.15625)


def test_preset_name_is_stripped_and_case_insensitive():
    assert parse_weights("  grad_v \n", "sd1").values == GRAD_V_SD1


def test_explicit_presets_mapping():
    mine = {"HALF": ",".join(["0.5"] * 20)}
    assert parse_weights("HALF", "sdxl", presets=mine).values == (0.5,) * 20
    assert "'HALF'" in error_of("HALF", "sd1", presets=mine)  # 20 values: not for sd1


def test_user_file_overrides_and_adds(tmp_path, monkeypatch):
    user = tmp_path / "mine.tsv"
    user.write_text(
        "preset_name\tpreset_weights\n"
        "# my own\n\n"
        "ALL_B\t" + ",".join(["0.25"] * 26) + "\n"
        "MINE:" + ",".join(["0.75"] * 26) + "\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("SUPERMERGER_PRESETS", str(user))
    assert user_presets_path() == user
    assert parse_weights("ALL_B", "sd1").values == (0.25,) * 26
    assert parse_weights("MINE", "sdxl").values == (0.75,) * 20
    assert parse_weights("GRAD_V", "sd1").values == GRAD_V_SD1
    assert load_presets(tmp_path / "nope.tsv")["ALL_B"].startswith("1,1")


def test_user_presets_path_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SUPERMERGER_PRESETS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_presets_path() == tmp_path / ".config" / "supermerger" / "mbw_presets.tsv"


def test_malformed_user_line_names_file_and_line(tmp_path):
    user = tmp_path / "bad.tsv"
    user.write_text("GOOD\t0,1\n# comment\nBROKEN 0,1,1\n", encoding="utf-8")
    with pytest.raises(WeightsError) as caught:
        load_presets(user)
    assert f"{user}:3" in str(caught.value)
    assert "BROKEN 0,1,1" in str(caught.value)


def test_broken_user_file_does_not_break_numbers(tmp_path, monkeypatch):
    user = tmp_path / "bad.tsv"
    user.write_text("no separator here\n", encoding="utf-8")
    monkeypatch.setenv("SUPERMERGER_PRESETS", str(user))
    assert parse_weights("ALL:1", "sd1").values == (1.0,) * 26


# --- numbers ---------------------------------------------------------------


def test_numbers_sd1_and_sdxl_native():
    sd1 = parse_weights(",".join(str(i) for i in range(26)), "sd1")
    assert sd1.values == tuple(float(i) for i in range(26))
    assert sd1.value_of("OUT11") == 25.0
    xl = parse_weights(" ,\n ".join(str(i / 10) for i in range(20)) + "\n", "sdxl")
    assert xl.value_of("out08") == 1.9


def test_numbers_one_per_line_without_commas_is_not_a_preset():
    message = error_of("\n".join(["0.5"] * 26), "sd1")
    assert "value 1" in message and "not a number" in message


def test_26_to_20_conversion_known_answer():
    text = ",".join(str(i) for i in range(26))  # BASE=0, IN00=1 ... OUT11=25
    expected = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22)
    assert parse_weights(text, "sdxl").values == tuple(float(v) for v in expected)
    assert sd1_to_sdxl(list(range(26))) == list(expected)


def test_single_number_is_a_count_error():
    assert "got 1" in error_of("0.5", "sd1")


@pytest.mark.parametrize(
    ("layout", "count", "needed"),
    [("sd1", 20, "26 values"), ("sd1", 17, "26 values"), ("sdxl", 17, "20 values")],
)
def test_wrong_count(layout, count, needed):
    message = error_of(",".join(["1"] * count), layout)
    assert needed in message and f"got {count}" in message
    if layout == "sdxl":
        assert "or 26 (converted)" in message and "OUT08" in message


def test_non_number_names_position_and_token():
    values = ["0"] * 26
    values[4] = "0.3x"
    assert "value 5 ('0.3x') is not a number" in error_of(",".join(values), "sd1")


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_non_finite_refused(bad):
    values = ["0"] * 25 + [bad]
    message = error_of(",".join(values), "sd1")
    assert f"value 26 ('{bad}')" in message and "finite" in message


@pytest.mark.parametrize("token", ["R", "U", "X"])
def test_random_tokens_refused(token):
    message = error_of(",".join(["0", token] + ["1"] * 24), "sd1")
    assert f"value 2 ('{token}')" in message and "not supported" in message


@pytest.mark.parametrize("name", ["ALL_R", "ALL_U", "ALL_X", "R"])
def test_random_presets_refused(name):
    message = error_of(name, "sd1")
    assert repr(name) in message and "random" in message and "not supported" in message


def test_unknown_preset_suggests_nearest():
    message = error_of("GRAD_W", "sd1")
    assert "'GRAD_W'" in message and "GRAD_V" in message
    assert "'ZZZZZZZZ'" in error_of("ZZZZZZZZ", "sdxl")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_string(text):
    assert "empty" in error_of(text, "sd1")


def test_unknown_layout():
    assert "'sd4'" in error_of("ALL:1", "sd4")


# --- readable form ---------------------------------------------------------


def test_readable_known_answers():
    bw = parse_weights("BASE:0, IN00-IN05:0.3, IN06-OUT11:1", "sd1")
    assert bw.values == (0.0,) + (0.3,) * 6 + (1.0,) * 19
    bw = parse_weights("ALL:0.5, M00:1", "sdxl")
    assert bw.values == (0.5,) * 10 + (1.0,) + (0.5,) * 9
    bw = parse_weights("ALL:0\nIN:0.25\nOUT:0.75", "sd1")
    assert bw.values == (0.0,) + (0.25,) * 12 + (0.0,) + (0.75,) * 12
    bw = parse_weights("*:1, BASE:-0.5", "sdxl")
    assert bw.values == (-0.5,) + (1.0,) * 19


def test_readable_range_across_groups_and_overrides():
    bw = parse_weights("ALL:0, IN06-OUT03:1, IN07:0.5", "sd1")
    ids = block_ids("sd1")
    expected = {i: 1.0 for i in ids[ids.index("IN06") : ids.index("OUT03") + 1]}
    expected["IN07"] = 0.5
    assert bw.values == tuple(expected.get(i, 0.0) for i in ids)


def test_readable_case_insensitive_and_mid_alias():
    lower = parse_weights("all:0, mid:1, in00-in02:0.5, Out8:0.25", "sdxl")
    upper = parse_weights("ALL:0, M00:1, IN00-IN02:0.5, OUT08:0.25", "sdxl")
    assert lower == upper
    assert lower.value_of("MID") == 1.0 and lower.value_of("IN2") == 0.5


def test_readable_uncovered_blocks_listed():
    message = error_of("BASE:0, IN00-IN05:0.3", "sd1")
    assert "IN06-OUT11" in message and "ALL:" in message
    message = error_of("IN:1, OUT:1", "sdxl")
    assert "BASE" in message and "M00" in message and "IN00" not in message


def test_readable_unknown_block_id():
    message = error_of("ALL:1, FOO:2", "sd1")
    assert "'FOO'" in message and "OUT11" in message


def test_readable_in10_for_sdxl():
    message = error_of("ALL:1, IN10:0", "sdxl")
    assert "'IN10'" in message and "SDXL" in message and "IN08" in message
    assert parse_weights("ALL:1, IN10:0", "sd1").value_of("IN10") == 0.0


def test_readable_reversed_range():
    message = error_of("ALL:1, OUT03-IN01:0", "sd1")
    assert "'OUT03-IN01'" in message and "IN01-OUT03" in message


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("ALL:abc", "'abc'"),
        ("ALL:nan", "'nan'"),
        ("ALL:R", "'R'"),
        ("ALL:1, IN00", "'IN00'"),
        ("ALL:1, :0.5", "':0.5'"),
        ("ALL:1, IN00-IN02-IN03:0", "'IN00-IN02-IN03'"),
    ],
)
def test_readable_bad_entries(text, culprit):
    assert culprit in error_of(text, "sd1")


# --- output forms and round trips ------------------------------------------


def test_as_text_and_as_readable_known():
    bw = parse_weights("BASE:0, IN00-IN05:0.3, IN06-OUT11:1", "sd1")
    assert bw.as_readable() == "BASE:0, IN00-IN05:0.3, IN06-OUT11:1"
    assert bw.as_text() == "0," + "0.3," * 6 + ",".join(["1"] * 19)
    assert parse_weights("GRAD_V", "sd1").as_text().split(",")[:3] == ["0", "1", "0.9166666667"]
    assert parse_weights("ALL:0.5", "sdxl").as_readable() == "ALL:0.5"
    assert format_number(0.0833333333) == "0.0833333333"


def test_block_weights_validates():
    with pytest.raises(WeightsError, match="got 3"):
        BlockWeights("sd1", (1.0, 2.0, 3.0))
    with pytest.raises(WeightsError, match="'NOPE'"):
        BlockWeights("sd1", (0.0,) * 26).value_of("NOPE")


finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def block_weights(draw):
    layout = draw(st.sampled_from(["sd1", "sdxl"]))
    size = len(block_ids(layout))
    # Few distinct values, so runs (and ranges in the readable form) appear.
    pool = draw(st.lists(finite, min_size=1, max_size=4))
    return BlockWeights(
        layout, tuple(draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size)))
    )


@settings(max_examples=150, deadline=None)
@given(block_weights())
def test_round_trips(bw):
    assert parse_weights(bw.as_readable(), bw.layout) == bw
    assert parse_weights(bw.as_text(), bw.layout) == bw
