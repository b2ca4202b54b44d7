"""Tests for mergers.adjust: parsing, each of the six keys with hand-computed values, colour tables."""

import pytest
import torch

from mergers.adjust import ADJUST_KEYS, Adjust, adjust_for_key, colour_offsets, parse_adjust
from mergers.arch import key_specs
from mergers.errors import ArchitectureError, WeightsError

IN_WEIGHT, IN_BIAS, OUT0_WEIGHT, OUT0_BIAS, OUT2_WEIGHT, OUT2_BIAS = ADJUST_KEYS


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-7)


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "  \n", "0,0,0,0,0,0,0,0", "0.0, 0, -0", (0,) * 8, [], ","])
def test_empty_or_zero_is_off(text):
    assert parse_adjust(text) is None


def test_eight_values():
    assert parse_adjust("1, 2,3,4, 5,6,7,-8.5").values == (1, 2, 3, 4, 5, 6, 7, -8.5)


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1,2,3", (1, 2, 3, 0, 0, 0, 0, 0)),
        ("0,0,0,0,1", (0, 0, 0, 0, 1, 0, 0, 0)),
        ("1,,3", (1, 0, 3, 0, 0, 0, 0, 0)),  # a blank entry is 0
        ("1,2,3,4,5,6,7,8,", (1, 2, 3, 4, 5, 6, 7, 8)),  # a trailing comma is ignored
        ("2", (2, 0, 0, 0, 0, 0, 0, 0)),  # the original turns a comma-less box off; we read it as IN
        ([0.5, -1], (0.5, -1, 0, 0, 0, 0, 0, 0)),
    ],
)
def test_fewer_values_are_padded_with_zeros(text, values):
    assert parse_adjust(text).values == values


def test_adjust_passes_through():
    adjust = Adjust((1, 0, 0, 0, 0, 0, 0, 0))
    assert parse_adjust(adjust) == adjust
    assert parse_adjust(Adjust((0,) * 8)) is None
    assert parse_adjust(adjust.as_text()) == adjust


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", r"adjust IN \('abc'\) is not a number"),
        ("1,x", r"adjust OUT \('x'\)"),
        ("0,0,0,0,0,0,0,bright", "COL3"),
        ("1,nan", "OUT .* not a finite number"),
        ("1,2,3,4,5,6,7,8,9", "at most 8 values.*got 9"),
        ([1] * 9, "got 9"),
        ([1, "z"], r"adjust OUT \('z'\)"),
    ],
)
def test_bad_values_are_errors(text, message):
    with pytest.raises(WeightsError, match=message):
        parse_adjust(text)


def test_adjust_needs_eight_finite_values():
    with pytest.raises(WeightsError, match="8 values"):
        Adjust((1, 2))
    with pytest.raises(WeightsError, match="BRI"):
        Adjust((0, 0, 0, 0, float("inf"), 0, 0, 0))


# --- the six keys ------------------------------------------------------------------------------


def test_detail_keys_known_answers():
    adjust = Adjust((10, -5, 3, 0, 0, 0, 0, 0))
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    bias = torch.tensor([1.0, -0.5])
    close(adjust_for_key(adjust, IN_WEIGHT, "sd1")(weight), [[0.9, -1.8], [0.45, 3.6]])  # × (1 − 10·0.01)
    close(adjust_for_key(adjust, IN_BIAS, "sd1")(bias), [1.2, -0.6])  # × (1 + 10·0.02)
    close(adjust_for_key(adjust, OUT0_WEIGHT, "sd1")(weight), [[1.05, -2.1], [0.525, 4.2]])  # × (1 + 5·0.01)
    close(adjust_for_key(adjust, OUT0_BIAS, "sd1")(bias), [0.9, -0.45])  # × (1 − 5·0.02)
    close(adjust_for_key(adjust, OUT2_WEIGHT, "sd1")(weight), [[0.97, -1.94], [0.485, 3.88]])  # × (1 − 3·0.01)
    close(adjust_for_key(adjust, OUT2_BIAS, "sd1")(bias.repeat(2)), [1.0, -0.5, 1.0, -0.5])  # no colour: + 0


def test_colour_bias_sd1():
    # CONT=1 → +0.02 on channel 0. BRI=1 → 0.02·(−1, 1/3, 2/3); COL1=2 → 0.04·(1, 1, 0).
    adjust = Adjust((0, 0, 0, 1, 1, 2, 0, 0))
    bias = torch.tensor([0.1, 0.2, 0.3, 0.4])
    close(adjust_for_key(adjust, OUT2_BIAS, "sd1")(bias), [0.12, 0.22, 0.3 + 0.04 + 0.02 / 3, 0.4 + 0.04 / 3])


def test_colour_bias_sdxl():
    # SDXL table: BRI=1 → 0.02·(0, 0, 1); COL1=2 → 0.04·(1, 0, 0).
    adjust = Adjust((0, 0, 0, 1, 1, 2, 0, 0))
    bias = torch.tensor([0.1, 0.2, 0.3, 0.4])
    close(adjust_for_key(adjust, OUT2_BIAS, "sdxl")(bias), [0.12, 0.24, 0.3, 0.42])


@pytest.mark.parametrize(
    ("colours", "sd1", "sdxl"),
    [
        ((1, 0, 0, 0), (-0.02, 0.02 / 3, 0.04 / 3), (0.0, 0.0, 0.02)),
        ((0, 1, 0, 0), (0.02, 0.02, 0.0), (0.02, 0.0, 0.0)),
        ((0, 0, 1, 0), (0.0, -0.02, -0.02), (-0.02, -0.02, 0.0)),
        ((0, 0, 0, 1), (0.02, 0.0, 0.02), (-0.02, 0.02, 0.0)),
        (
            (2, -1, 0.5, 3),
            (-0.04 - 0.02 + 0.06, 0.04 / 3 - 0.02 - 0.01, 0.08 / 3 - 0.01 + 0.06),
            (-0.02 - 0.01 - 0.06, -0.01 + 0.06, 0.04),
        ),
    ],
)
def test_colour_tables(colours, sd1, sdxl):
    assert colour_offsets(colours, "sd1") == pytest.approx(sd1, abs=1e-15)
    assert colour_offsets(colours, "sdxl") == pytest.approx(sdxl, abs=1e-15)


def test_unknown_layout():
    with pytest.raises(ArchitectureError, match="sd3"):
        adjust_for_key(Adjust((1,) + (0,) * 7), OUT2_BIAS, "sd3")


# --- dtypes, purity, other keys -----------------------------------------------------------------


def test_dtypes_follow_torch_promotion():
    adjust = Adjust((5, 5, 5, 1, 1, 1, 1, 1))
    half = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16)
    # A tensor times a Python float keeps its dtype; + torch.tensor(list) (float32) promotes 16-bit biases.
    assert adjust_for_key(adjust, IN_WEIGHT, "sd1")(half).dtype == torch.float16
    assert adjust_for_key(adjust, OUT0_BIAS, "sd1")(half).dtype == torch.float16
    assert adjust_for_key(adjust, OUT2_BIAS, "sd1")(half).dtype == torch.float32
    assert adjust_for_key(adjust, OUT2_BIAS, "sd1")(half.to(torch.bfloat16)).dtype == torch.float32
    assert adjust_for_key(adjust, OUT2_BIAS, "sd1")(half.to(torch.float64)).dtype == torch.float64
    close(adjust_for_key(adjust, IN_WEIGHT, "sd1")(half), [0.95, 1.9, 2.85, 3.8])  # rounded to fp16 alike


def test_input_is_not_modified():
    adjust = Adjust((4, 4, 4, 4, 4, 4, 4, 4))
    for key in ADJUST_KEYS:
        tensor = torch.arange(4, dtype=torch.float32)
        before = tensor.clone()
        out = adjust_for_key(adjust, key, "sdxl")(tensor)
        assert torch.equal(tensor, before) and out.data_ptr() != tensor.data_ptr()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_only_the_six_keys_are_adjusted(family):
    adjust = Adjust((1,) * 8)
    layout = "sdxl" if family == "sdxl" else "sd1"
    adjusted = {spec.key for spec in key_specs(family) if adjust_for_key(adjust, spec.key, layout) is not None}
    assert adjusted == set(ADJUST_KEYS)
    assert adjust_for_key(adjust, "model_ema.diffusion_modelout2bias", layout) is None
