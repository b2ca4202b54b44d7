"""Tests for mergers.dice: the original's random block weights, seed for seed."""

import doctest
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mergers.dice
from mergers.arch.layouts import block_ids
from mergers.dice import (
    BLOCK_FORMULAS,
    DEFAULT_CUSTOM,
    DICE_MODES,
    Dice,
    ElementDraws,
    elemental_text,
    mode_pattern,
    resolve_limits,
    roll,
)
from mergers.errors import WeightsError
from mergers.weights import parse_weights, sd1_to_sdxl

SD1 = block_ids("sd1")
SDXL = block_ids("sdxl")
SEEDS = (0, 1, 42, 1234, 987654321, 4294967295)
FAST = settings(max_examples=40, deadline=None)


# --- the original's flow, written out plainly --------------------------------


def original_draws(seed):
    """``np.random.seed(seed); np.random.rand(3000)`` on the global generator, state restored."""
    saved = np.random.get_state()
    try:
        np.random.seed(int(seed))
        return np.random.rand(3000)
    finally:
        np.random.set_state(saved)


def original_pattern(mode, custom, blocks=26):
    """What the random mode writes into the weights box before a merge."""
    if mode == "custom":
        return custom if "," in custom else ",".join([custom] * blocks)
    return ",".join([mode] * blocks)


def original_text(value, hi, lo, digits):
    """Clamp as the original does (min, then max: a binding bound is a Python float), then round."""
    value = min(value, float(hi))
    value = max(value, float(lo))
    return str(round(value, digits))


def original_deal(weights, draws, offset, up, low, upd, lowd, digits):
    """The original's per-block dealer, aRp aside; returns (weights text, elemental text)."""
    up, low, upd, lowd = up.split(","), low.split(","), upd.split(","), lowd.split(",")
    upd = upd * 26 if len(upd) == 1 else upd
    lowd = lowd * 26 if len(lowd) == 1 else lowd
    out, elements = [], {"R": [], "U": [], "X": []}
    for i, token in enumerate(weights.split(",")):
        r = draws[i + offset]
        t = token.strip()
        if t == "R":
            raw = r
        elif t == "U":
            raw = 1.5 - 2 * r
        elif t == "X":
            raw = (float(low[i]) - float(up[i])) * r + float(up[i])
        elif t == "D":
            raw = float(up[i]) + float(low[i]) * (r - 0.5)
        elif t in ("ER", "EU", "EX"):
            elements[t[1]].append(SD1[i])
            out.append("0")
            continue
        else:
            out.append(token)
            continue
        out.append(original_text(raw, upd[i], lowd[i], digits))
    deep = ",".join(" ".join(ids) + "::" + key for key, ids in elements.items() if ids)
    return ",".join(out), deep


def original_element(letter, draws, block, num, up, low, digits):
    """The original's ratio for the key numbered ``num`` in block ``block``."""
    r = draws[num + 100]
    if letter == "R":
        return round(r, digits)
    if letter == "U":
        return round(1 - 2 * r, digits)
    low_value, up_value = float(low.split(",")[block]), float(up.split(",")[block])
    return round((low_value - up_value) * r + up_value, digits)


def limit_lists(seed):
    """Varied per-block limit boxes for one seed (strings of 26 values)."""
    rng = random.Random(seed)
    up = ",".join(str(round(rng.uniform(0.2, 1.2), 2)) for _ in SD1)
    low = ",".join(str(round(rng.uniform(-0.3, 0.6), 2)) for _ in SD1)
    return up, low


# --- golden: the same strings as the original ---------------------------------

GOLDEN_CASES = [
    (mode, digits, clamps)
    for mode in ("R", "U", "X", "D", "custom", "ER", "EU", "EX")
    for digits in (1, 3, 15)
    for clamps in (("1", "0"), ("0.9", "0.1"), ("1.2,0.8," + "1," * 23 + "1", "-0.5"))
]


@pytest.mark.parametrize("mode,digits,clamps", GOLDEN_CASES)
def test_sd1_rolls_equal_the_originals_strings(mode, digits, clamps):
    for seed in SEEDS:
        up, low = limit_lists(seed)
        dice = Dice(
            mode=mode,
            seed=seed,
            round=digits,
            upper=up,
            lower=low,
            upper_clamp=clamps[0],
            lower_clamp=clamps[1],
            beta=True,
        )
        result = roll(dice, "sd1")
        draws = original_draws(seed)
        weights = original_pattern(mode, DEFAULT_CUSTOM)
        alpha, deep = original_deal(weights, draws, 0, up, low, *clamps, digits)
        beta, _ = original_deal(weights, draws, 50, up, low, *clamps, digits)
        assert (result.weights_alpha, result.weights_beta, result.elemental) == (alpha, beta, deep)


def test_seed_1234_mode_r_literal_values():
    # Computed once with numpy's RandomState(1234): a change in numpy's stream shows here.
    values = roll(Dice(mode="R", seed=1234), "sd1").weights_alpha.split(",")
    assert values[:5] == ["0.192", "0.622", "0.438", "0.785", "0.78"]


def test_seed_1234_mode_u_literal_values():
    # 1.5 - 2·0.1915… = 1.117 is clamped to the upper clamp 1, a Python float: "1.0".
    values = roll(Dice(mode="U", seed=1234, round=5), "sd1").weights_alpha.split(",")
    assert values[:3] == ["1.0", "0.25578", "0.62454"]


def test_high_round_uses_numpys_round_like_the_original():
    # At 15 decimals numpy's round (scale, rint, unscale) and Python's differ now and then;
    # unclamped values are numpy floats in the original, so numpy's round is the one.
    numpy_texts, python_texts, ours = [], [], []
    for seed in range(10):
        draws = original_draws(seed)[:26]
        numpy_texts += [str(round(r, 15)) for r in draws]
        python_texts += [str(round(float(r), 15)) for r in draws]
        ours += roll(Dice(mode="R", seed=seed, round=15), "sd1").weights_alpha.split(",")
    assert ours == numpy_texts
    assert ours != python_texts  # the test can tell the two apart


def test_custom_and_given_weights_roll_like_the_original():
    custom = "R,0.5,U,X,D,ER,0,EU,EX," + ",".join(["R"] * 17)
    for seed in SEEDS:
        result = roll(Dice(mode="custom", seed=seed, custom=custom), "sd1")
        up26, low26 = ",".join(["1"] * 26), ",".join(["0"] * 26)
        expected = original_deal(custom, original_draws(seed), 0, up26, low26, "1", "0", 3)
        assert (result.weights_alpha, result.elemental) == expected
        off = roll(Dice(seed=seed), "sd1", weights_alpha=custom)
        assert (off.weights_alpha, off.elemental) == expected


# --- seeds ----------------------------------------------------------------------


def test_same_seed_same_roll_and_different_seeds_differ():
    dice = Dice(mode="U", seed=77, beta=True)
    assert roll(dice, "sd1") == roll(dice, "sd1")
    assert roll(dice, "sd1").weights_alpha != roll(Dice(mode="U", seed=78), "sd1").weights_alpha


def test_seed_minus_one_returns_a_seed_that_replays():
    first = roll(Dice(mode="X", lower="0.2R0.5"), "sd1")
    assert 0 <= first.seed < 4294967294
    again = roll(Dice(mode="X", lower="0.2R0.5", seed=first.seed), "sd1")
    assert again == first


def test_alpha_and_beta_read_their_own_draws():
    draws = original_draws(9)
    result = roll(Dice(mode="R", seed=9, round=15, beta=True), "sd1")
    assert result.weights_alpha.split(",")[0] == str(round(draws[0], 15))
    assert result.weights_beta.split(",")[0] == str(round(draws[50], 15))


# --- ranges ------------------------------------------------------------------------

unit_draws = st.floats(min_value=0, max_value=1, exclude_max=True)
limits = st.floats(min_value=-2, max_value=3)


@FAST
@given(unit_draws, limits, limits)
def test_formulas_stay_in_their_ranges(r, low, up):
    r = np.float64(r)
    assert 0 <= BLOCK_FORMULAS["R"](r, low, up) < 1
    assert -0.5 < BLOCK_FORMULAS["U"](r, low, up) <= 1.5
    x = BLOCK_FORMULAS["X"](r, low, up)
    assert min(low, up) - 1e-12 <= x <= max(low, up) + 1e-12
    d = BLOCK_FORMULAS["D"](r, low, up)
    assert up - abs(low) / 2 - 1e-12 <= d <= up + abs(low) / 2 + 1e-12


def _values(text):
    return [float(v) for v in text.split(",")]


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_rolled_values_stay_in_range_before_clamping(seed, digits):
    slack = 0.5 * 10.0**-digits
    wide = {"upper_clamp": "10", "lower_clamp": "-10", "round": digits, "seed": seed}
    for value in _values(roll(Dice(mode="R", **wide), "sd1").weights_alpha):
        assert 0 <= value <= 1
    for value in _values(roll(Dice(mode="U", **wide), "sd1").weights_alpha):
        assert -0.5 - slack <= value <= 1.5
    for value in _values(roll(Dice(mode="X", upper="0.8", lower="0.3", **wide), "sd1").weights_alpha):
        assert 0.3 - slack <= value <= 0.8 + slack
    for value in _values(roll(Dice(mode="D", upper="0.5", lower="0.4", **wide), "sd1").weights_alpha):
        assert 0.3 - slack <= value <= 0.7 + slack


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(0, 6), st.sampled_from("RUXD"))
def test_clamped_and_rounded(seed, digits, mode):
    # The original rounds after clamping, so at 0 decimals a clamp of 0.7 reads 1.0.
    slack = 0.5 * 10.0**-digits
    dice = Dice(mode=mode, seed=seed, round=digits, upper="1.4", lower="0.8", upper_clamp="0.7", lower_clamp="0.2")
    for value in _values(roll(dice, "sd1").weights_alpha):
        assert 0.2 - slack <= value <= 0.7 + slack
        assert round(value, digits) == value


# --- elemental modes ----------------------------------------------------------------


@pytest.mark.parametrize("mode,letter", [("ER", "R"), ("EU", "U"), ("EX", "X")])
def test_element_modes_zero_the_blocks_and_write_elemental_entries(mode, letter):
    result = roll(Dice(mode=mode, seed=5, beta=True), "sd1")
    assert result.weights_alpha == ",".join(["0"] * 26)
    assert result.weights_beta == ",".join(["0"] * 26)
    assert result.elemental == " ".join(SD1) + "::" + letter


def test_elemental_text_groups_by_letter_in_r_u_x_order():
    custom = "EX,ER,0,EU,ER" + ",0" * 21
    result = roll(Dice(mode="custom", seed=1, custom=custom), "sd1")
    assert result.elemental == "IN00 IN03::R,IN02::U,BASE::X"
    assert elemental_text([]) == ""


def test_element_draws_follow_the_originals_ratios():
    for seed in SEEDS:
        up, low = limit_lists(seed)
        draws = roll(Dice(mode="EX", seed=seed, upper=up, lower=low, round=4), "sd1").element_draws
        reference = original_draws(seed)
        for key_index in (0, 1, 57, 1100, 2899):
            for block in (0, 7, 25):
                for letter in "RUX":
                    expected = original_element(letter, reference, block, key_index, up, low, 4)
                    assert draws.draw(letter, key_index, block) == expected


def test_element_draws_refuse_bad_positions_and_letters():
    draws = roll(Dice(seed=2), "sd1").element_draws
    with pytest.raises(WeightsError, match="key_index 2900"):
        draws.draw("R", 2900, 0)
    with pytest.raises(WeightsError, match="key_index -1"):
        draws.draw("R", -1, 0)
    with pytest.raises(WeightsError, match="block_index 26"):
        draws.draw("X", 0, 26)
    with pytest.raises(WeightsError, match="'D'"):
        draws.draw("D", 0, 0)
    with pytest.raises(WeightsError, match="key_index"):
        draws.draw("R", 1.5, 0)
    assert isinstance(draws, ElementDraws) and draws.draw(" R ", 0, 0) == draws.draw("R", 0, 0)


def test_element_x_with_a_chance_lower_limit_uses_its_value():
    draws = roll(Dice(seed=4, upper="0.9", lower="0.5R0.2"), "sd1").element_draws
    r = original_draws(4)[103]
    assert draws.draw("X", 3, 1) == round((0.5 - 0.9) * r + 0.9, 3)


# --- the aRp coin ----------------------------------------------------------------


def test_chance_lower_limit_is_reproducible_with_the_seed():
    dice = Dice(mode="X", seed=31, upper="0.9", lower="0.4R0.5", beta=True)
    assert roll(dice, "sd1") == roll(dice, "sd1")
    values = _values(roll(dice, "sd1").weights_alpha)
    assert 0 in values and any(0.4 <= v <= 0.9 for v in values)


def test_chance_one_always_keeps_the_limit_and_chance_zero_never():
    always = _values(roll(Dice(mode="X", seed=8, upper="0.9", lower="0.4R1"), "sd1").weights_alpha)
    assert all(0.4 <= v <= 0.9 for v in always)
    never = roll(Dice(mode="X", seed=8, upper="0.9", lower="0.4R0", lower_clamp="0.05"), "sd1")
    assert _values(never.weights_alpha) == [0.05] * 26
    midpoint = roll(Dice(mode="D", seed=8, upper="0.6", lower="0.4R0"), "sd1")
    assert _values(midpoint.weights_alpha) == [0.6] * 26


def test_chance_coins_come_from_random_random_of_the_seed():
    seed, chance = 12, 0.5
    coins = random.Random(seed)
    heads = [coins.random() <= chance for _ in SD1]
    values = _values(roll(Dice(mode="X", seed=seed, upper="0.9", lower=f"0.4R{chance}"), "sd1").weights_alpha)
    assert [v != 0 for v in values] == heads


# --- which text is rolled ----------------------------------------------------------


def test_off_mode_rolls_only_the_letters_in_given_weights():
    result = roll(Dice(seed=3), "sd1", weights_alpha="GRAD_V", weights_beta="ALL:0.5")
    assert (result.weights_alpha, result.weights_beta, result.elemental) == ("GRAD_V", "ALL:0.5", "")
    rolled = roll(Dice(seed=3), "sd1", weights_alpha="R," + ",".join(["0.5"] * 25))
    assert rolled.weights_alpha.split(",")[1:] == ["0.5"] * 25
    assert roll(Dice(seed=3), "sd1").weights_alpha is None


def test_mode_replaces_only_the_selected_sides():
    given_alpha, given_beta = "GRAD_V", "ALL:1"
    result = roll(
        Dice(mode="R", seed=3, alpha=False, beta=True), "sd1", weights_alpha=given_alpha, weights_beta=given_beta
    )
    assert result.weights_alpha == given_alpha
    assert len(result.weights_beta.split(",")) == 26


def test_random_preset_names_stand_for_their_letters():
    by_name = roll(Dice(seed=6), "sd1", weights_alpha="ALL_U")
    by_letters = roll(Dice(mode="U", seed=6), "sd1")
    assert by_name.weights_alpha == by_letters.weights_alpha


def test_mode_pattern():
    assert mode_pattern(Dice(mode="D"), "sd1") == ",".join(["D"] * 26)
    assert mode_pattern(Dice(mode="custom", custom="X"), "sdxl") == ",".join(["X"] * 20)
    assert mode_pattern(Dice(mode="custom"), "sd1") == DEFAULT_CUSTOM


# --- SDXL ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["R", "U", "X", "D", "custom"])
def test_sdxl_rolls_twenty_values_equal_to_the_originals_converted_ones(mode):
    for seed in SEEDS:
        xl = roll(Dice(mode=mode, seed=seed, upper="0.8", lower="0.2", beta=True), "sdxl")
        sd1 = roll(Dice(mode=mode, seed=seed, upper="0.8", lower="0.2", beta=True), "sd1")
        assert xl.weights_alpha.split(",") == sd1_to_sdxl(sd1.weights_alpha.split(","))
        assert xl.weights_beta.split(",") == sd1_to_sdxl(sd1.weights_beta.split(","))
        assert len(parse_weights(xl.weights_alpha, "sdxl").values) == 20


def test_sdxl_limits_take_twenty_or_twenty_six_values():
    upper26, upper20 = ",".join(str(i / 100) for i in range(26)), None
    upper20 = ",".join(sd1_to_sdxl(upper26.split(",")))
    a = roll(Dice(mode="X", seed=1, upper=upper26), "sdxl")
    b = roll(Dice(mode="X", seed=1, upper=upper20), "sdxl")
    assert a == b
    assert resolve_limits(Dice(upper=upper26), "sdxl").upper[10] == 0.13  # M00 is SD1's 14th


def test_sdxl_element_modes_use_sdxl_names():
    result = roll(Dice(mode="EU", seed=1), "sdxl")
    assert result.weights_alpha == ",".join(["0"] * 20)
    assert result.elemental == " ".join(SDXL) + "::U"


def test_sdxl_given_26_weights_with_letters_become_20():
    result = roll(Dice(seed=2), "sdxl", weights_alpha=",".join(["R"] * 26))
    assert result.weights_alpha == roll(Dice(mode="R", seed=2), "sdxl").weights_alpha


# --- validation -------------------------------------------------------------------------

BAD_DICE = [
    ({"mode": "RR"}, "mode 'RR'"),
    ({"mode": "Custom"}, "did you mean 'custom'"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": -2}, "seed -2"),
    ({"seed": 2**32}, "seed 4294967296"),
    ({"round": -1}, "round -1"),
    ({"round": 2.0}, "round"),
    ({"round": 309}, "round 309"),
    ({"upper": 1}, "upper must be text"),
    ({"alpha": "yes"}, "alpha"),
]


@pytest.mark.parametrize("fields,message", BAD_DICE)
def test_bad_dice_are_refused(fields, message):
    with pytest.raises(WeightsError, match=message):
        Dice(**fields)


BAD_ROLLS = [
    ({"upper": "1,1,1"}, "sd1", "upper needs one value per SD1/SD2 block, 26; got 3"),
    ({"lower": "0,0"}, "sdxl", r"lower needs one value per SDXL block, 20 \(or 26\); got 2"),
    ({"upper_clamp": "1,1"}, "sd1", "upper_clamp needs"),
    ({"lower_clamp": "0,0"}, "sd1", "lower_clamp needs"),
    ({"upper": "big"}, "sd1", "upper value 1 \\('big'\\)"),
    ({"upper": "nan"}, "sd1", "upper value 1"),
    ({"lower_clamp": "0,x" + ",0" * 24}, "sd1", "lower_clamp value 2"),
    ({"lower": "0.5R"}, "sd1", "lower value 1"),
    ({"lower": "R0.3"}, "sd1", "lower value 1"),
    ({"lower": "0.5R0.3R1"}, "sd1", "more than one R"),
    ({"upper": "0.5R0.3"}, "sd1", "upper value 1"),
    ({"mode": "custom", "custom": "R,R"}, "sd1", "weights_alpha needs"),
    ({"mode": "custom", "custom": "Q" + ",R" * 25}, "sd1", "custom value 1 \\('Q'\\)"),
    ({}, "sd4", "unknown layout 'sd4'"),
]


@pytest.mark.parametrize("fields,layout,message", BAD_ROLLS)
def test_bad_limits_and_patterns_are_refused(fields, layout, message):
    with pytest.raises(WeightsError, match=message):
        roll(Dice(seed=1, **fields), layout)


def test_given_weights_with_letters_need_one_value_per_block():
    with pytest.raises(WeightsError, match="weights_beta needs"):
        roll(Dice(seed=1), "sd1", weights_beta="R,0.5")
    with pytest.raises(WeightsError, match="weights_alpha must be text"):
        roll(Dice(seed=1), "sd1", weights_alpha=0.5)


def test_every_mode_is_listed_and_rolls():
    for mode in DICE_MODES:
        result = roll(Dice(mode=mode, seed=1), "sd1", weights_alpha="ALL:0.5")
        parse_weights(result.weights_alpha, "sd1")


def test_docstring_examples():
    assert doctest.testmod(mergers.dice).failed == 0


def test_dice_on_flux_say_they_roll_sd_layouts_only():
    with pytest.raises(WeightsError, match="SD1/SD2 and SDXL block weights only"):
        roll(Dice(mode="R", seed=1), "flux")
    assert roll(Dice(mode="off"), "flux").weights_alpha is None  # off: nothing to roll, nothing refused
