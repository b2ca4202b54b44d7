"""XYZ axes: the original's axis types, their value syntax, and what a value changes in a cell.

An axis is a type and the text typed for it. The text is split as the original
splits it (commas, lines, pairs of lines, blank-line blocks, a count) and every
value is parsed and checked *before* anything runs; a bad value raises
:class:`XyzError` naming the axis, its type, the value's position and the value.

A value then changes a cell's :class:`Draft` (recipe fields, txt2img settings).
"Pinpoint" types take their number from the alpha (or beta) axis: the draft
keeps both parts and :func:`finish_draft` combines them once every axis is in.

Example:
    >>> axis = parse_axis("X", "alpha", "0.2, 0.4", AxisContext(layout="sd1"))
    >>> [value.label for value in axis.values]
    ['0.2', '0.4']
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergers.adjust import ADJUST_FIELDS, parse_adjust
from mergers.arch.layouts import block_ids
from mergers.elemental import parse_elemental
from mergers.errors import MergeError
from mergers.history import History
from mergers.keyfilter import parse_key_filter
from mergers.methods import method_for
from mergers.methods.modes import calcmode_name, mode_name
from mergers.weights import finite_float, format_number, parse_weights

NONE = "none"
AXIS_NAMES = ("X", "Y", "Z")
FRESH_SEED_BOUND = 4294967294  # seed -1: the original draws random.randrange(4294967294)
PINPOINT_TYPES = ("pinpoint blocks", "pinpoint element", "pinpoint adjust")
# Types whose values only change what is generated: cells along them share one merge.
GENERATION_TYPES = frozenset({"seed", "prompt"})
# The same type on two axes is refused (the original's "same type selected for X,Y"), except these.
REPEATABLE_TYPES = frozenset({NONE, "add elemental"})
NOT = "NOT"
ALL = "ALL"


class XyzError(MergeError):
    """An XYZ axis value or plot setting is invalid; the message names the axis and the value."""


@dataclass(frozen=True)
class AxisContext:
    """What parsing needs: the models' block layout, a model resolver and the merge history."""

    layout: str = "sd1"
    resolve: Callable[[str], Path] | None = None
    history: History | None = None


@dataclass(frozen=True)
class AxisValue:
    """One parsed value: what the grid shows, and what the cell gets."""

    label: str
    value: Any


@dataclass(frozen=True)
class Axis:
    """An axis as typed (``type``, ``text``) and parsed (``values``); a "none" axis has one blank value."""

    name: str
    type: str
    text: str
    values: tuple[AxisValue, ...]

    @property
    def active(self) -> bool:
        return self.type != NONE


@dataclass
class Draft:
    """One cell while the axes are applied: recipe fields, txt2img fields, pinpoint parts."""

    recipe: dict[str, Any]
    generation: dict[str, Any]
    types: frozenset[str]  # every axis type of the plot (pinpoint types take the alpha/beta value)
    pin: dict[str, Any] = field(default_factory=dict)


# --- splitting, as the original's ``adjuster`` ------------------------------------------------


def split_commas(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def split_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_commas_or_lines(text: str) -> list[str]:
    return split_commas(text.replace("\n", ","))


def split_blank_lines(text: str) -> list[str]:
    return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


def split_line_pairs(text: str) -> list[tuple[str, str]]:
    lines = split_lines(text)
    if len(lines) % 2:
        raise ValueError(f"needs pairs of lines (alpha's weights, then beta's); got {len(lines)} lines")
    return [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]


def split_count(text: str) -> list[str]:
    count = text.strip()
    if not count.isdigit() or not 0 < int(count) <= 1000:
        raise ValueError(f"random takes the number of draws (1 to 1000), not {text.strip()!r}")
    return [""] * int(count)


# --- parsing one value --------------------------------------------------------------------------


def parse_ratio(text: str, ctx: AxisContext) -> float:
    number = finite_float(text)
    if number is None:
        raise ValueError(f"{text!r} is not a number")
    return number


def parse_ratio_pair(text: str, ctx: AxisContext) -> tuple[float, float]:
    parts = text.split()
    if len(parts) not in (1, 2):
        raise ValueError(f"{text!r} is not 'alpha beta' (or one number for both)")
    numbers = [parse_ratio(part, ctx) for part in parts]
    return numbers[0], numbers[-1]


def parse_seed(text: str, ctx: AxisContext) -> int:
    if not re.fullmatch(r"-?\d+", text) or not -1 <= int(text) < 2**32:
        raise ValueError(f"{text!r} is not a seed (0 to 4294967295, or -1 for a random one)")
    return random.randrange(FRESH_SEED_BOUND) if int(text) == -1 else int(text)


def parse_block_weights(text: str, ctx: AxisContext) -> str:
    parse_weights(text, ctx.layout)
    return text


def parse_weight_pair(pair: tuple[str, str], ctx: AxisContext) -> tuple[str, str]:
    return parse_block_weights(pair[0], ctx), parse_block_weights(pair[1], ctx)


def parse_model(text: str, ctx: AxisContext) -> str:
    if ctx.resolve is not None:
        ctx.resolve(text)
    return text


def parse_calcmode(text: str, ctx: AxisContext) -> str:
    return calcmode_name(text)


def parse_mode(text: str, ctx: AxisContext) -> str:
    return mode_name(text)


def parse_elemental_text(text: str, ctx: AxisContext) -> str:
    parse_elemental(text.replace("\n", ","), ctx.layout)
    return text.replace("\n", ",")


def parse_pinpoint_blocks(text: str, ctx: AxisContext) -> tuple[str, ...]:
    """``IN01``, ``OUT10 OUT11``, ``OUT03-OUT06``, ``NOT M00 OUT03-OUT06`` → the blocks it names."""
    ids = block_ids(ctx.layout)
    tokens = text.split()
    negate = bool(tokens) and tokens[0] == NOT
    named: list[str] = []
    for token in tokens[1:] if negate else tokens:
        named += _block_span(token, ids)
    if not named:
        raise ValueError("names no block")
    chosen = [block for block in ids if (block in named) != negate]
    return tuple(chosen)


def _block_span(token: str, ids: tuple[str, ...]) -> list[str]:
    first, _, last = token.upper().partition("-")
    for name in (first, last or first):
        if name not in ids:
            raise ValueError(f"{name!r} is not a block; blocks are {', '.join(ids)}")
    start, end = sorted((ids.index(first), ids.index(last or first)))
    return list(ids[start: end + 1])


def parse_pinpoint_element(text: str, ctx: AxisContext) -> str:
    if text.count(":") != 1:
        raise ValueError(f"{text!r} is not 'Blocks:elements' (e.g. 'OUT05:attn2')")
    parse_elemental(f"{text}:0", ctx.layout)
    return text


def parse_blocks_filter(text: str, ctx: AxisContext) -> str:
    parse_key_filter("include", text, "", layout=ctx.layout)
    return text


def parse_adjust_text(text: str, ctx: AxisContext) -> str:
    parse_adjust(text)
    return text


def parse_adjust_name(text: str, ctx: AxisContext) -> int:
    name = text.upper()
    if name not in ADJUST_FIELDS:
        raise ValueError(f"{text!r} is not one of {', '.join(ADJUST_FIELDS)}")
    return ADJUST_FIELDS.index(name)


def parse_prompt(text: str, ctx: AxisContext) -> str:
    return text


def parse_random(text: str, ctx: AxisContext) -> int:
    return random.randrange(FRESH_SEED_BOUND)


def parse_merge_id(text: str, ctx: AxisContext) -> dict[str, Any]:
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"{text!r} is not a merge ID")
    if ctx.history is None:
        raise ValueError("there is no merge history here")
    return _recipe_fields(ctx.history.get(int(text)).recipe.to_dict())


def _recipe_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in data.items() if name not in ("format", "version")}


# --- applying one value to a cell -----------------------------------------------------------------


def set_alpha(draft: Draft, value: float) -> None:
    if draft.types & set(PINPOINT_TYPES):
        draft.pin["alpha"] = value
    else:
        draft.recipe["alpha"] = value


def set_beta(draft: Draft, value: float) -> None:
    if "pinpoint blocks" in draft.types:
        draft.pin["beta"] = value
    else:
        draft.recipe["beta"] = value


def set_alpha_and_beta(draft: Draft, value: tuple[float, float]) -> None:
    draft.recipe["alpha"], draft.recipe["beta"] = value


def set_recipe_field(name: str) -> Callable[[Draft, Any], None]:
    def apply(draft: Draft, value: Any) -> None:
        draft.recipe[name] = value
    return apply


def set_generation_field(name: str) -> Callable[[Draft, Any], None]:
    def apply(draft: Draft, value: Any) -> None:
        draft.generation[name] = value
    return apply


def set_both_weights(draft: Draft, value: tuple[str, str]) -> None:
    draft.recipe["weights_alpha"], draft.recipe["weights_beta"] = value


def add_elemental(draft: Draft, value: str) -> None:
    draft.recipe["elemental"] = ",".join(part for part in (draft.recipe.get("elemental"), value) if part)


def set_blocks_filter(mode: str, *, add: bool) -> Callable[[Draft, str], None]:
    def apply(draft: Draft, value: str) -> None:
        earlier = draft.recipe.get("include_exclude_blocks") if add else None
        draft.recipe["include_exclude"] = mode
        draft.recipe["include_exclude_blocks"] = " ".join(part for part in (earlier, value) if part)
    return apply


def set_pin(part: str) -> Callable[[Draft, Any], None]:
    def apply(draft: Draft, value: Any) -> None:
        draft.pin[part] = value
    return apply


def set_dice_seed(draft: Draft, value: int) -> None:
    draft.recipe["dice"] = {**draft.recipe["dice"], "seed": value}


def replace_recipe(draft: Draft, value: dict[str, Any]) -> None:
    draft.recipe.clear()
    draft.recipe.update(value)


# --- the table of types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisType:
    """How one axis type splits its text, parses a value, labels it and applies it to a cell."""

    split: Callable[[str], list]
    parse: Callable[[Any, AxisContext], Any]
    apply: Callable[[Draft, Any], None]
    label: Callable[[Any, Any], str] = lambda raw, value: str(raw)


def _pair_label(raw: tuple[str, str], value: Any) -> str:
    return f"alpha: {raw[0]}, beta: {raw[1]}"


AXIS_TYPES: dict[str, AxisType] = {
    "alpha": AxisType(split_commas, parse_ratio, set_alpha),
    "beta": AxisType(split_commas, parse_ratio, set_beta),
    "alpha and beta": AxisType(split_commas, parse_ratio_pair, set_alpha_and_beta),
    "seed": AxisType(split_commas, parse_seed, set_generation_field("seed"), lambda raw, value: str(value)),
    "mbw alpha": AxisType(split_lines, parse_block_weights, set_recipe_field("weights_alpha")),
    "mbw beta": AxisType(split_lines, parse_block_weights, set_recipe_field("weights_beta")),
    "mbw alpha and beta": AxisType(split_line_pairs, parse_weight_pair, set_both_weights, _pair_label),
    "model_A": AxisType(split_commas, parse_model, set_recipe_field("model_a")),
    "model_B": AxisType(split_commas, parse_model, set_recipe_field("model_b")),
    "model_C": AxisType(split_commas, parse_model, set_recipe_field("model_c")),
    "calcmode": AxisType(split_commas, parse_calcmode, set_recipe_field("calcmode")),
    "merge mode": AxisType(split_commas, parse_mode, set_recipe_field("mode")),
    "elemental": AxisType(split_blank_lines, parse_elemental_text, set_recipe_field("elemental")),
    "add elemental": AxisType(split_blank_lines, parse_elemental_text, add_elemental),
    "pinpoint blocks": AxisType(split_commas, parse_pinpoint_blocks, set_pin("blocks")),
    "pinpoint element": AxisType(split_commas_or_lines, parse_pinpoint_element, set_pin("element")),
    "include blocks": AxisType(split_commas, parse_blocks_filter, set_blocks_filter("include", add=False)),
    "exclude blocks": AxisType(split_commas, parse_blocks_filter, set_blocks_filter("exclude", add=False)),
    "add include": AxisType(split_commas, parse_blocks_filter, set_blocks_filter("include", add=True)),
    "add exclude": AxisType(split_commas, parse_blocks_filter, set_blocks_filter("exclude", add=True)),
    "adjust": AxisType(split_lines, parse_adjust_text, set_recipe_field("adjust")),
    "pinpoint adjust": AxisType(split_commas, parse_adjust_name, set_pin("adjust")),
    "prompt": AxisType(split_lines, parse_prompt, set_generation_field("prompt")),
    "random": AxisType(split_count, parse_random, set_dice_seed, lambda raw, value: f"seed {value}"),
    "merge ID": AxisType(split_commas, parse_merge_id, replace_recipe, lambda raw, value: f"ID {raw}"),
}
TYPE_NAMES = (NONE, *AXIS_TYPES)
# "ALL" expands to every choice, as the original's ``alldealer``.
ALL_VALUES = {"pinpoint adjust": lambda layout: ",".join(ADJUST_FIELDS),
              "pinpoint blocks": lambda layout: ",".join(block_ids(layout))}


def parse_axis(name: str, type_name: str, text: str, ctx: AxisContext) -> Axis:
    """Split and parse one axis; an XyzError names the axis, the value's position and the value.

    Example:
        >>> parse_axis("Y", "mbw alpha", "GRAD_V\\nFLAT_25", AxisContext()).values[1].label
        'FLAT_25'
    """
    text = text or ""
    if type_name == NONE:
        return Axis(name, NONE, "", (AxisValue("", None),))
    kind = _axis_type(name, type_name)
    if text.strip() == ALL and type_name in ALL_VALUES:
        text = ALL_VALUES[type_name](ctx.layout)
    try:
        raws = kind.split(text)
    except ValueError as error:
        raise XyzError(f"{name} axis ({type_name}): {error}") from None
    if not raws:
        raise XyzError(f"{name} axis ({type_name}) has no values")
    return Axis(name, type_name, text, tuple(_parse_value(name, type_name, kind, n, raw, ctx)
                                             for n, raw in enumerate(raws, start=1)))


def _axis_type(name: str, type_name: str) -> AxisType:
    try:
        return AXIS_TYPES[type_name]
    except KeyError:
        raise XyzError(f"{name} axis: unknown type {type_name!r}; choose one of {', '.join(TYPE_NAMES)}") from None


def _parse_value(name: str, type_name: str, kind: AxisType, position: int, raw: Any, ctx: AxisContext) -> AxisValue:
    try:
        value = kind.parse(raw, ctx)
    except (ValueError, MergeError) as error:
        shown = " / ".join(raw) if isinstance(raw, tuple) else raw
        raise XyzError(f"{name} axis ({type_name}), value {position} {shown!r}: {error}") from None
    return AxisValue(kind.label(raw, value), value)


def check_axes(axes: tuple[Axis, ...], *, dice_mode: str = "off") -> None:
    """Rules between axes: X is set, no type twice, pinpoint types have their alpha/beta axis.

    Example:
        >>> check_axes((x_axis, y_axis, z_axis))
    """
    types = [axis.type for axis in axes]
    if types[0] == NONE:
        raise XyzError("X axis: choose a type (it is 'none')")
    twice = sorted({t for t in types if types.count(t) > 1} - REPEATABLE_TYPES)
    if twice:
        raise XyzError(f"{twice[0]!r} is on two axes; put each type on one axis")
    if "pinpoint blocks" in types and not {"alpha", "beta"} & set(types):
        raise XyzError("pinpoint blocks needs alpha or beta on another axis (the value the blocks get)")
    for kind in ("pinpoint element", "pinpoint adjust"):
        if kind in types and "alpha" not in types:
            raise XyzError(f"{kind} needs alpha on another axis (the value it gets)")
    if "random" in types and dice_mode == "off":
        raise XyzError("the random axis draws the dice: choose a Random Mode other than off")


def apply_value(draft: Draft, axis: Axis, value: AxisValue) -> None:
    """Change ``draft`` as ``value`` of ``axis`` says (nothing for a "none" axis)."""
    if axis.active:
        AXIS_TYPES[axis.type].apply(draft, value.value)


def finish_draft(draft: Draft, layout: str) -> None:
    """Combine the pinpoint parts with their alpha/beta value, and force a mode that uses beta when
    a beta axis needs one (the original switches to "sum Twice")."""
    if "blocks" in draft.pin:
        _pin_blocks(draft, layout)
    if "element" in draft.pin:
        add_elemental(draft, f"{draft.pin['element']}:{format_number(draft.pin['alpha'])}")
    if "adjust" in draft.pin:
        _pin_adjust(draft)
    if draft.types & {"beta", "mbw beta", "mbw alpha and beta", "alpha and beta"}:
        method = method_for(mode_name(draft.recipe["mode"]), calcmode_name(draft.recipe["calcmode"]))
        if not method.uses_beta:
            draft.recipe["mode"] = "sum_twice"


def _pin_blocks(draft: Draft, layout: str) -> None:
    side = "alpha" if "alpha" in draft.pin else "beta"
    text = draft.recipe.get(f"weights_{side}")
    ids = block_ids(layout)
    values = list(parse_weights(text, layout).values) if text else [draft.recipe[side]] * len(ids)
    for block in draft.pin["blocks"]:
        values[ids.index(block)] = draft.pin[side]
    draft.recipe[f"weights_{side}"] = ",".join(format_number(v) for v in values)


def _pin_adjust(draft: Draft) -> None:
    adjust = parse_adjust(draft.recipe.get("adjust"))
    values = list(adjust.values) if adjust else [0.0] * len(ADJUST_FIELDS)
    values[draft.pin["adjust"]] = draft.pin["alpha"]
    draft.recipe["adjust"] = ",".join(format_number(v) for v in values)
