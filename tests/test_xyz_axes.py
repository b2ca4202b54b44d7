"""XYZ axes: every type's value syntax, valid and invalid, and the rules between axes."""

import pytest

from mergers.history import History
from mergers.recipe import Recipe
from mergers.xyz.axes import AXIS_TYPES, TYPE_NAMES, AxisContext, Draft, XyzError, check_axes, finish_draft, parse_axis

SD1 = AxisContext(layout="sd1")


def _history(tmp_path) -> History:
    history = History(tmp_path)
    history.add(Recipe(model_a="a", model_b="b", alpha=0.7, weights_alpha="GRAD_V"), name="first")
    return history


def _values(type_name, text, ctx=SD1):
    return [v.value for v in parse_axis("X", type_name, text, ctx).values]


# (type, text, parsed values) for every type; ids keep the table readable
VALID = [
    ("alpha", "0.2, 0.4,1", [0.2, 0.4, 1.0]),
    ("beta", "-0.5,1.5,", [-0.5, 1.5]),
    ("alpha and beta", "0.2 0.3, 0.5", [(0.2, 0.3), (0.5, 0.5)]),
    ("seed", "1, 42", [1, 42]),
    ("mbw alpha", "GRAD_V\nALL:0.5, OUT:1\n" + ",".join(["0"] * 26), ["GRAD_V", "ALL:0.5, OUT:1", ",".join(["0"] * 26)]),
    ("mbw beta", "FLAT_25\n\nFLAT_75", ["FLAT_25", "FLAT_75"]),
    ("mbw alpha and beta", "GRAD_V\nGRAD_A\nFLAT_25\nFLAT_75", [("GRAD_V", "GRAD_A"), ("FLAT_25", "FLAT_75")]),
    ("model_A", "a.safetensors, b", ["a.safetensors", "b"]),
    ("model_B", "b", ["b"]),
    ("model_C", "c", ["c"]),
    ("calcmode", "normal, cosineA, Tensor", ["normal", "cosineA", "tensor"]),
    ("merge mode", "Weight sum, add_difference", ["weight_sum", "add_difference"]),
    ("elemental", "OUT03 OUT04:attn2:0.5\n\nNOT M00:norm:0\nIN00::1", ["OUT03 OUT04:attn2:0.5", "NOT M00:norm:0,IN00::1"]),
    ("add elemental", "IN01::0", ["IN01::0"]),
    ("pinpoint blocks", "IN01, OUT10 OUT11, OUT05-OUT03", [("IN01",), ("OUT10", "OUT11"), ("OUT03", "OUT04", "OUT05")]),
    ("pinpoint element", "OUT05:attn2\nIN01:NOT norm", ["OUT05:attn2", "IN01:NOT norm"]),
    ("include blocks", "IN00 IN01, NOT BASE VAE", ["IN00 IN01", "NOT BASE VAE"]),
    ("exclude blocks", "VAE Adjust", ["VAE Adjust"]),
    ("add include", "M00", ["M00"]),
    ("add exclude", "OUT11", ["OUT11"]),
    ("adjust", "2,0,0,0,0,0,1,0\n0,0,0,1", ["2,0,0,0,0,0,1,0", "0,0,0,1"]),
    ("pinpoint adjust", "IN, col2", [0, 6]),
    ("prompt", "a cat\n\na dog, sitting", ["a cat", "a dog, sitting"]),
]


@pytest.mark.parametrize("type_name,text,expected", VALID, ids=[row[0] for row in VALID])
def test_every_type_parses_the_originals_syntax(type_name, text, expected):
    assert _values(type_name, text) == expected


def test_the_table_covers_every_type_but_the_drawn_ones():
    drawn = {"random", "merge ID"}  # their values depend on dice or on history: tested below
    assert {row[0] for row in VALID} | drawn == set(AXIS_TYPES)
    assert TYPE_NAMES[0] == "none"


INVALID = [
    ("alpha", "0.2, abc", "value 2 'abc'"),
    ("beta", "nan", "value 1 'nan'"),
    ("alpha and beta", "0.1 0.2 0.3", "value 1"),
    ("seed", "1, 2.5", "value 2 '2.5'"),
    ("seed", "-2", "value 1"),
    ("mbw alpha", "GRAD_V\nNOPE_PRESET", "value 2 'NOPE_PRESET'"),
    ("mbw alpha", "0,1,1", "value 1"),
    ("mbw alpha and beta", "GRAD_V\nGRAD_A\nFLAT_25", "pairs of lines"),
    ("calcmode", "normal, cosineZ", "value 2 'cosineZ'"),
    ("merge mode", "Weight average", "value 1"),
    ("elemental", "OUT99:attn2:0.5", "value 1"),
    ("pinpoint blocks", "IN01, OUT42", "value 2 'OUT42'"),
    ("pinpoint element", "OUT05", "value 1 'OUT05'"),
    ("include blocks", "IN01 BLOCK7", "value 1"),
    ("adjust", "1,2,3,4,5,6,7,8,9", "value 1"),
    ("pinpoint adjust", "IN, SHARPNESS", "value 2 'SHARPNESS'"),
    ("random", "many", "number of draws"),
    ("random", "0", "number of draws"),
    ("merge ID", "one", "value 1 'one'"),
    ("alpha", " , ", "has no values"),
]


@pytest.mark.parametrize("type_name,text,where", INVALID, ids=[f"{r[0]}:{r[1]}" for r in INVALID])
def test_a_bad_value_is_reported_with_its_axis_type_and_position(type_name, text, where):
    with pytest.raises(XyzError, match=f"^X axis \\({type_name}\\)") as error:
        parse_axis("X", type_name, text, SD1)
    assert where in str(error.value)


def test_model_values_are_resolved_when_a_resolver_is_given():
    known = {"a.safetensors"}

    def resolve(name):
        if name not in known:
            from mergers.errors import CheckpointError
            raise CheckpointError(f"model {name!r} is not in the folder")
        return name

    ctx = AxisContext("sd1", resolve)
    assert _values("model_B", "a.safetensors", ctx) == ["a.safetensors"]
    with pytest.raises(XyzError, match=r"Y axis \(model_B\), value 2 'zzz': model 'zzz' is not in the folder"):
        parse_axis("Y", "model_B", "a.safetensors, zzz", ctx)


def test_seed_minus_one_and_random_draw_fixed_seeds():
    seeds = _values("seed", "-1, -1, 5")
    assert all(0 <= s < 2**32 for s in seeds) and seeds[2] == 5
    draws = parse_axis("X", "random", "4", SD1).values
    assert len(draws) == 4 and all(v.label == f"seed {v.value}" for v in draws)


def test_merge_id_reads_the_recipe_from_history(tmp_path):
    ctx = AxisContext("sd1", history=_history(tmp_path))
    (value,) = parse_axis("Z", "merge ID", "-1", ctx).values
    assert value.label == "ID -1" and value.value["weights_alpha"] == "GRAD_V" and value.value["alpha"] == 0.7
    with pytest.raises(XyzError, match=r"Z axis \(merge ID\), value 1 '9'"):
        parse_axis("Z", "merge ID", "9", ctx)


def test_all_expands_pinpoint_blocks_and_adjust_for_the_layout():
    blocks = _values("pinpoint blocks", "ALL", AxisContext("sdxl"))
    assert len(blocks) == 20 and blocks[0] == ("BASE",) and blocks[-1] == ("OUT08",)
    assert _values("pinpoint adjust", "ALL") == list(range(8))


def test_not_in_pinpoint_blocks_takes_every_other_block():
    (blocks,) = _values("pinpoint blocks", "NOT M00 OUT03-OUT11")
    assert "M00" not in blocks and "OUT03" not in blocks and "OUT02" in blocks and len(blocks) == 26 - 10


def _axes(*types):
    return tuple(parse_axis(name, t, {"none": "", "alpha": "0.5", "beta": "0.5", "pinpoint blocks": "IN01",
                                      "pinpoint element": "IN01:attn", "pinpoint adjust": "IN", "random": "2",
                                      "add elemental": "IN01::1", "seed": "1"}[t], SD1)
                 for name, t in zip("XYZ", types))


@pytest.mark.parametrize("types,message", [
    (("none", "alpha", "none"), "X axis: choose a type"),
    (("alpha", "alpha", "none"), "'alpha' is on two axes"),
    (("pinpoint blocks", "seed", "none"), "pinpoint blocks needs alpha or beta"),
    (("pinpoint element", "beta", "none"), "pinpoint element needs alpha"),
    (("pinpoint adjust", "seed", "none"), "pinpoint adjust needs alpha"),
    (("random", "none", "none"), "Random Mode"),
])
def test_rules_between_axes(types, message):
    with pytest.raises(XyzError, match=message):
        check_axes(_axes(*types))


def test_rules_allow_repeated_add_elemental_and_pinpoint_with_its_value():
    check_axes(_axes("add elemental", "add elemental", "none"))
    check_axes(_axes("pinpoint blocks", "beta", "seed"))
    check_axes(_axes("random", "seed", "none"), dice_mode="R")


def _draft(types, **recipe):
    fields = {**Recipe(model_a="a", model_b="b").to_dict(), **recipe}
    return Draft(fields, {}, frozenset(types))


def test_pinpoint_blocks_put_the_alpha_value_in_the_named_blocks_of_the_weights():
    draft = _draft({"pinpoint blocks", "alpha"}, alpha=0.5)
    draft.pin.update(blocks=("IN01", "M00"), alpha=0.9)
    finish_draft(draft, "sd1")
    values = draft.recipe["weights_alpha"].split(",")
    assert values[2] == values[13] == "0.9" and values.count("0.5") == 24


def test_pinpoint_element_and_adjust_append_the_alpha_value():
    draft = _draft({"pinpoint element", "alpha"}, elemental="IN00::0")
    draft.pin.update(element="OUT05:attn2", alpha=0.25)
    finish_draft(draft, "sd1")
    assert draft.recipe["elemental"] == "IN00::0,OUT05:attn2:0.25"
    draft = _draft({"pinpoint adjust", "alpha"}, adjust="1,0,0")
    draft.pin.update(adjust=3, alpha=2.0)
    finish_draft(draft, "sd1")
    assert draft.recipe["adjust"] == "1,0,0,2,0,0,0,0"


def test_a_beta_axis_switches_weight_sum_to_sum_twice_as_the_original():
    draft = _draft({"beta"})
    finish_draft(draft, "sd1")
    assert draft.recipe["mode"] == "sum_twice"
    draft = _draft({"beta"}, mode="triple_sum", model_c="c")
    finish_draft(draft, "sd1")
    assert draft.recipe["mode"] == "triple_sum"
