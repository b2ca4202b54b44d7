"""Which registered method a (merge mode, calculation mode) pair runs.

The pair the user picks in the UI resolves through this one table; a pair
missing from it is not offered (and is refused with the valid choices).
"""

from __future__ import annotations

from mergers.errors import RecipeError
from mergers.methods.registry import get_method, normalise_name, suggest

# snake_case name → the original's UI label
MODES = {
    "weight_sum": "Weight sum",
    "add_difference": "Add difference",
    "triple_sum": "Triple sum",
    "sum_twice": "sum Twice",
}

CALCMODES = ("normal",)

# (mode, calcmode) → registered method name
METHOD_TABLE = {
    ("weight_sum", "normal"): "weight_sum",
    ("add_difference", "normal"): "add_difference",
    ("triple_sum", "normal"): "triple_sum",
    ("sum_twice", "normal"): "sum_twice",
}


def mode_name(text: str) -> str:
    """The snake_case mode for a UI label or snake name.

    Example:
        >>> mode_name("sum Twice")
        'sum_twice'
    """
    name = normalise_name(text.split(":", 1)[0])  # the original stores "Weight sum:A*(1-alpha)+B*alpha"
    if name not in MODES:
        raise RecipeError(f"unknown merge mode {text!r}{suggest(text, MODES)}; choose one of {', '.join(MODES.values())}")
    return name


def calcmode_name(text: str) -> str:
    """The canonical calculation-mode name (the original's spelling).

    Example:
        >>> calcmode_name("Normal")
        'normal'
    """
    for calcmode in CALCMODES:
        if normalise_name(calcmode) == normalise_name(text):
            return calcmode
    raise RecipeError(f"unknown calculation mode {text!r}{suggest(text, CALCMODES)}; choose one of {', '.join(CALCMODES)}")


def method_for(mode: str, calcmode: str = "normal"):
    """The registered method that runs ``mode`` with ``calcmode``.

    Example:
        >>> method_for("Add difference", "normal").name
        'add_difference'
    """
    mode, calcmode = mode_name(mode), calcmode_name(calcmode)
    name = METHOD_TABLE.get((mode, calcmode))
    if name is None:
        valid = [c for (m, c) in METHOD_TABLE if m == mode]
        raise RecipeError(f"calculation mode {calcmode!r} does not go with {MODES[mode]!r}; it takes {', '.join(valid)}")
    return get_method(name)
