"""Which registered method a (merge mode, calculation mode) pair runs.

The pair the user picks in the UI resolves through this one table; a pair
missing from it is not offered (and is refused with the valid choices).
"""

from __future__ import annotations

from mergers.errors import RecipeError
from mergers.methods.registry import get_method, normalise_name, suggest

# snake_case name → the UI label (the original's four, then the task-arithmetic family of
# mergers/methods/task.py). A label must normalise to its snake name, so either spelling resolves.
MODES = {
    "weight_sum": "Weight sum",
    "add_difference": "Add difference",
    "triple_sum": "Triple sum",
    "sum_twice": "sum Twice",
    "slerp": "SLERP",
    "add_perpendicular": "Add perpendicular",
    "ties": "TIES",
    "dare": "DARE",
    "dare_ties": "DARE-TIES",
    "model_breadcrumbs": "Model Breadcrumbs",
    "model_stock": "Model Stock",
    "geometric_median": "Geometric median",
}

# The original's calculation modes, in its UI order, then our corrected variant, then the arithmetic of
# other tools (mergers/methods/foreign.py), which a replay of their recipes uses.
CALCMODES = ("normal", "cosineA", "cosineB", "trainDifference", "smoothAdd", "smoothAdd MT", "extract",
             "tensor", "tensor2", "self", "plus random", "cosineA consistent", "A1111", "sd-mecha")

# (mode, calcmode) → registered method name. Pairs follow the original's
# calcmode_en.md ("Available modes"); a pair missing here is refused.
METHOD_TABLE = {
    ("weight_sum", "normal"): "weight_sum",
    ("add_difference", "normal"): "add_difference",
    ("triple_sum", "normal"): "triple_sum",
    ("sum_twice", "normal"): "sum_twice",
    ("weight_sum", "cosineA"): "cosine_a",
    ("weight_sum", "cosineB"): "cosine_b",
    ("weight_sum", "cosineA consistent"): "cosine_a_consistent",
    ("add_difference", "trainDifference"): "train_difference",
    ("add_difference", "smoothAdd"): "smooth_add",
    # "MT" was the original's CPU thread pool; our torch filter is parallel (and on the GPU) either way.
    ("add_difference", "smoothAdd MT"): "smooth_add",
    ("add_difference", "extract"): "extract",
    ("weight_sum", "tensor"): "tensor",
    ("weight_sum", "tensor2"): "tensor2",
    ("weight_sum", "self"): "self",
    ("weight_sum", "plus random"): "plus_random",
    # Beyond the original: each new mode runs its one method with calculation mode "normal".
    **{(mode, "normal"): mode for mode in ("slerp", "add_perpendicular", "ties", "dare", "dare_ties",
                                            "model_breadcrumbs", "model_stock", "geometric_median")},
    # Computed as A1111's Checkpoint Merger computes (its add difference is ours, op for op).
    ("weight_sum", "A1111"): "a1111_weight_sum",
    ("add_difference", "A1111"): "add_difference",
    # Computed as sd-mecha 1.x computes its built-in methods.
    **{(mode, "sd-mecha"): f"mecha_{method}" for mode, method in (
        ("weight_sum", "weighted_sum"), ("add_difference", "add_difference"), ("slerp", "slerp"),
        ("add_perpendicular", "add_perpendicular"), ("ties", "ties"), ("model_stock", "model_stock"),
        ("geometric_median", "geometric_median"))},
}


def calcmodes_for(mode: str) -> list[str]:
    """The calculation modes that go with ``mode`` (for the UI to offer).

    Example:
        >>> calcmodes_for("Add difference")
        ['normal', 'trainDifference', 'smoothAdd', 'smoothAdd MT', 'extract']
    """
    mode = mode_name(mode)
    return [c for c in CALCMODES if (mode, c) in METHOD_TABLE]


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
    raise RecipeError(f"unknown calculation mode {text!r}{_suggest_calcmode(text)}; choose one of {', '.join(CALCMODES)}")


def _suggest_calcmode(text: str) -> str:
    hint = suggest(text, CALCMODES)
    for calcmode in CALCMODES:  # suggest() speaks snake_case; show the original's spelling
        hint = hint.replace(repr(normalise_name(calcmode)), repr(calcmode))
    return hint


def method_for(mode: str, calcmode: str = "normal"):
    """The registered method that runs ``mode`` with ``calcmode``.

    Example:
        >>> method_for("Add difference", "normal").name
        'add_difference'
    """
    mode, calcmode = mode_name(mode), calcmode_name(calcmode)
    name = METHOD_TABLE.get((mode, calcmode))
    if name is None:
        takes = [MODES[m] for (m, c) in METHOD_TABLE if c == calcmode]
        raise RecipeError(f"calculation mode {calcmode!r} does not go with {MODES[mode]!r}; "
                          f"{calcmode} works with {', '.join(takes)}; {MODES[mode]} takes {', '.join(calcmodes_for(mode))}")
    return get_method(name)
