"""One registry of merge methods, and the table that picks one for a mode.

A method is a pure tensor function registered by name with
``@merge_method``. The executor owns dtype, device and the key loop; a method
only says which precision it wants:

- ``"fp32"``: inputs arrive as float32 (the original computes these in fp32);
- ``"native"``: inputs arrive in their own dtype (promoted to a common one when
  they differ), as the original computes add difference and triple sum, so our
  fp16 results match its fp16 results bit for bit.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from torch import Tensor

from mergers.errors import RecipeError

PRECISIONS = ("fp32", "native")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what the executor needs to know about it."""

    name: str
    label: str
    func: Callable[..., Tensor]
    models: int  # tensors it takes: 2 (A, B) or 3 (A, B, C)
    params: tuple[str, ...]  # keyword-only hyper-parameters, e.g. ("alpha", "beta")
    precision: str
    formula: str
    skip_keys: tuple[str, ...] = ()  # keys holding any of these stay as A
    prepass: Optional["Prepass"] = None  # statistics over the whole model, gathered first
    bounds: tuple[tuple[str, float, float], ...] = ()  # (param, low, high) every ratio must respect
    elementwise: bool = False  # each output element depends only on the inputs' same element

    @property
    def uses_beta(self) -> bool:
        return "beta" in self.params

    def skips(self, key: str) -> bool:
        """True when this method leaves ``key`` as in model A."""
        return any(part in key for part in self.skip_keys)

    def check_bounds(self, **values: float) -> None:
        """Refuse a ratio outside the method's domain, naming it."""
        for param, low, high in self.bounds:
            value = values.get(param)
            if value is not None and not low <= value <= high:
                raise RecipeError(f"{self.label} needs {low} ≤ {param} ≤ {high}; got {param} = {value}")


METHODS: dict[str, MergeMethod] = {}


class Prepass(Protocol):
    """Whole-model statistics a method needs before its first key (cosineA/B).

    The executor streams the keys ``wants`` accepts, calls ``collect`` on each
    (A, B) pair and hands ``reduce`` of all results to the method as keywords.
    """

    def wants(self, key: str) -> bool: ...

    def collect(self, a: Tensor, b: Tensor) -> Any: ...

    def reduce(self, collected: list) -> dict[str, Any]: ...


def merge_method(name: str, *, label: str, precision: str = "fp32", formula: str = "",
                 skip_keys: tuple[str, ...] = (), prepass: Optional[Prepass] = None,
                 bounds: tuple[tuple[str, float, float], ...] = (), elementwise: bool = False):
    """Register a pure merge function under ``name``; returns the function unchanged.

    ``elementwise``: the function may be given any slice of its inputs and gives that slice
    of the result (the engine then widens fp8 a stretch at a time, not a whole tensor).

    Example:
        >>> @merge_method("weight_sum", label="Weight sum")
        ... def weight_sum(a, b, *, alpha): return torch.lerp(a, b, alpha)
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")

    def register(func: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        signature = inspect.signature(func).parameters.values()
        models = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in signature)
        params = tuple(p.name for p in signature if p.kind is p.KEYWORD_ONLY)
        METHODS[name] = MergeMethod(name, label, func, models, params, precision,
                                    formula or (func.__doc__ or "").strip().splitlines()[0],
                                    skip_keys, prepass, bounds, elementwise)
        return func

    return register


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name`` (snake_case or its UI label).

    Example:
        >>> get_method("Add difference").models
        3
    """
    found = METHODS.get(normalise_name(name)) or _by_label(name)
    if found is None:
        raise RecipeError(f"unknown merge method {name!r}{suggest(name, METHODS)}")
    return found


def normalise_name(text: str) -> str:
    """``"Add difference"`` → ``"add_difference"``; ``"sum Twice"`` → ``"sum_twice"``."""
    return "_".join(text.strip().lower().replace("-", " ").split())


def suggest(name: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(normalise_name(name), [normalise_name(c) for c in choices], n=2)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _by_label(label: str) -> MergeMethod | None:
    return next((m for m in METHODS.values() if m.label.lower() == label.strip().lower()), None)
