"""The Recipe: the one description of a merge.

The CLI, the UI, the API, history and a saved model's metadata all speak it.
A Recipe is frozen and validated when built; it serialises to versioned JSON
and back without loss.

A model slot holds a model name or another Recipe, whose result is then the
input (a chained recipe, merged key by key in the same pass: mergers/chain.py);
``more_models`` holds models D, E, … for methods that take any number. A recipe
that uses either is written as version 2, so an older supermerger refuses it
clearly; every other recipe is written, and read, as version 1 always was.

Example:
    >>> r = Recipe(model_a="a.safetensors", model_b="b.safetensors", mode="Weight sum", alpha=0.3)
    >>> Recipe.from_json(r.to_json()) == r
    True
    >>> chained = Recipe(model_a=r, model_b="c.safetensors", model_c="d.safetensors", mode="Add difference")
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import secrets
from dataclasses import asdict, dataclass, fields, replace
from typing import Union

from mergers.dice import Dice
from mergers.errors import RecipeError
from mergers.methods import method_for
from mergers.methods.modes import calcmode_name, mode_name
from mergers.writer import OUTPUT_DTYPES

RECIPE_FORMAT = "supermerger-recipe"
RECIPE_VERSION = 2  # 2: model slots may hold recipes, and more_models; plain recipes are still written as 1
PLAIN_RECIPE_VERSION = 1
# A chain deeper than this is a mistake or a hostile file (each level holds its inputs' tensors of one key).
MAX_CHAIN_DEPTH = 16
MODEL_SLOTS = ("model_a", "model_b", "model_c")


@dataclass(frozen=True)
class Recipe:
    """What to merge and how; every field has the original SuperMerger's meaning."""

    model_a: Union[str, "Recipe"]
    model_b: Union[str, "Recipe"]
    model_c: Union[str, "Recipe", None] = None
    mode: str = "weight_sum"
    calcmode: str = "normal"
    alpha: float = 0.5
    beta: float = 0.25
    # Block weights, as typed: 26/20 numbers, a preset name or the readable form.
    # When set they decide every key (BASE is their first value) and the scalar is unused.
    weights_alpha: str | None = None
    weights_beta: str | None = None
    # Elemental merge: "Blocks:Elements:Ratio" entries overriding the block ratio of alpha.
    elemental: str | None = None
    elemental_extended: bool = False  # SDXL: block names are the 110 fine ids ("use extended XL")
    # Include/Exclude: "off" | "include" | "exclude"; blocks (ids, VAE, Adjust) and key substrings.
    include_exclude: str = "off"
    include_exclude_blocks: str | None = None
    include_exclude_elements: str | None = None
    adjust: str | None = None  # "IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3"
    # Let the dice roll: random block weights. A merge records what it drew (the weights, and
    # the seed that element-level draws need) and sets the mode to "off", so it replays as run.
    dice: Dice = Dice()
    gamma: float = 0.3  # the original's "option(gamma)", used by calcmode extract
    seed: int = -1  # for calcmode "plus random"; -1 draws one when the merge runs (and records it)
    dtype: str | None = None  # "fp16" | "bf16" | "fp32" | "fp8_e4m3fn" | "fp8_e5m2" | None: as model A
    prune: bool = False
    reset_clip: bool = False
    bake_vae: str | None = None
    # Models D, E, … (names or recipes) for methods that take any number of models.
    more_models: tuple = ()
    # The inputs' key fingerprints (mergers.arch.key_fingerprint, comma-separated), recorded for models no
    # layout file describes: their blocks come from their keys, so a replay refuses files with other keys.
    key_fingerprint: str | None = None

    def __post_init__(self):
        set_ = object.__setattr__  # normalising inside a frozen dataclass
        for name in ("mode", "calcmode"):
            if not isinstance(getattr(self, name), str):
                raise RecipeError(f"{name} must be text, not {getattr(self, name)!r}")
        for name in MODEL_SLOTS:
            set_(self, name, _model_slot(name, getattr(self, name), optional=name == "model_c"))
        set_(self, "more_models", _more_models(self.more_models))
        set_(self, "mode", mode_name(self.mode))
        set_(self, "calcmode", calcmode_name(self.calcmode))
        for name in ("alpha", "beta", "gamma"):
            set_(self, name, _finite(name, getattr(self, name)))
        set_(self, "seed", _integer("seed", self.seed))
        set_(self, "include_exclude", _include_exclude_mode(self.include_exclude))
        for name in ("weights_alpha", "weights_beta", "dtype", "bake_vae", "elemental",
                     "include_exclude_blocks", "include_exclude_elements", "adjust", "key_fingerprint"):
            set_(self, name, _blank_to_none(getattr(self, name)))
        _check(self)

    @property
    def method(self):
        """The registered merge method this recipe runs."""
        return method_for(self.mode, self.calcmode)

    @property
    def models(self) -> tuple:
        """The input models the method needs, A first: names, or recipes for chained inputs."""
        if takes_any_number(self.method):
            return tuple(m for m in (self.model_a, self.model_b, self.model_c, *self.more_models) if m is not None)
        return (self.model_a, self.model_b, self.model_c)[: self.method.models]

    @property
    def is_chained(self) -> bool:
        """True when an input is another recipe's result, or there are models past C."""
        return bool(self.more_models) or any(isinstance(getattr(self, n), Recipe) for n in MODEL_SLOTS)

    def with_changes(self, **changes) -> "Recipe":
        """A copy with some fields changed (validated again).

        Example:
            >>> [recipe.with_changes(alpha=x) for x in (0.2, 0.4)]
        """
        return replace(self, **changes)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({name: _slot_to_data(values[name]) for name in MODEL_SLOTS},
                      dice=asdict(self.dice), more_models=[_slot_to_data(m) for m in self.more_models])
        if not self.more_models:
            del values["more_models"]  # a plain recipe's JSON stays exactly as version 1 wrote it
        if self.key_fingerprint is None:
            del values["key_fingerprint"]
        version = RECIPE_VERSION if self.is_chained else PLAIN_RECIPE_VERSION
        return {"format": RECIPE_FORMAT, "version": version, **values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict, *, _depth: int = 0) -> "Recipe":
        """Build a recipe from ``to_dict`` output (or a hand-written dict); a model slot may hold a
        nested recipe object.

        Example:
            >>> Recipe.from_dict({"model_a": {"model_a": "a", "model_b": "b"}, "model_b": "c"}).is_chained
            True
        """
        if _depth > MAX_CHAIN_DEPTH:
            raise RecipeError(f"recipes are nested more than {MAX_CHAIN_DEPTH} deep")
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a JSON object, not {type(data).__name__}")
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise RecipeError(f"recipe version {version!r} is newer than this supermerger understands ({RECIPE_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"format", "version"}
        if unknown:
            raise RecipeError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        missing = [name for name in ("model_a", "model_b") if not data.get(name)]
        if missing:
            raise RecipeError(f"recipe is missing {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        for name in MODEL_SLOTS:
            if isinstance(values.get(name), dict):
                values[name] = cls.from_dict(values[name], _depth=_depth + 1)
        if isinstance(values.get("more_models"), list):
            values["more_models"] = tuple(cls.from_dict(m, _depth=_depth + 1) if isinstance(m, dict) else m
                                          for m in values["more_models"])
        if isinstance(values.get("dice"), dict):
            values["dice"] = _dice_from_dict(values["dice"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(f"recipe is not valid JSON: {error}") from None
        return cls.from_dict(data)


def takes_any_number(method) -> bool:
    """True for a method whose function takes ``*models`` (TIES, DARE… over N fine-tunes)."""
    return _has_var_positional(method.func)


@functools.cache  # planning asks once per key; inspect.signature was most of a plan's time
def _has_var_positional(func) -> bool:
    return any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(func).parameters.values())


def _check(recipe: Recipe) -> None:
    method = recipe.method
    if method.models == 3 and not recipe.model_c:
        raise RecipeError(f"{method.label!r} needs model C")
    if recipe.more_models and not takes_any_number(method):
        raise RecipeError(f"{method.label!r} takes {method.models} models; more_models "
                          f"({len(recipe.more_models)} given) is only for methods that take any number")
    if not recipe.model_a or not recipe.model_b:
        raise RecipeError("a merge needs model A and model B")
    if recipe.dtype is not None and recipe.dtype not in OUTPUT_DTYPES:
        raise RecipeError(f"dtype {recipe.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)} (or empty for 'as model A')")
    if not isinstance(recipe.dice, Dice):
        raise RecipeError(f"dice must be dice settings, not {recipe.dice!r}")
    for name in ("prune", "reset_clip", "elemental_extended"):
        if not isinstance(getattr(recipe, name), bool):
            raise RecipeError(f"{name} must be true or false, not {getattr(recipe, name)!r}")


def _finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise RecipeError(f"{name} must be a finite number, not {value!r}")
    return number


def _dice_from_dict(data: dict) -> Dice:
    unknown = set(data) - {f.name for f in fields(Dice)}
    if unknown:
        raise RecipeError(f"unknown dice field(s): {', '.join(sorted(unknown))}")
    return Dice(**data)


def _include_exclude_mode(value) -> str:
    mode = str(value or "off").strip().lower()
    if mode not in ("off", "include", "exclude"):
        raise RecipeError(f"include_exclude must be off, include or exclude, not {value!r}")
    return mode


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecipeError(f"{name} must be an integer, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise RecipeError(f"{name} must be an integer, not {value!r}") from None
    if number != float(value) or not -1 <= number < 2**63:
        raise RecipeError(f"{name} must be an integer from -1 to 2**63 - 1, not {value!r}")
    return number


def resolve_seed(recipe: "Recipe") -> "Recipe":
    """The recipe with seed -1 replaced by a fresh random seed, when its method uses one.

    Example:
        >>> resolve_seed(Recipe(model_a="a", model_b="b", calcmode="plus random")).seed >= 0
        True
    """
    if recipe.seed != -1 or "seed" not in recipe.method.params:
        return recipe
    return recipe.with_changes(seed=secrets.randbelow(2**32))


def _model_slot(name: str, value, *, optional: bool):
    """A model name (stripped) or a nested Recipe; a dict is read as a recipe."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, dict):
        return Recipe.from_dict(value)
    if not isinstance(value, str) and not (optional and value is None):
        raise RecipeError(f"{name} must be a model name or a recipe, not {value!r}")
    if optional and isinstance(value, str):
        return value.strip() or None
    return value


def _more_models(value) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise RecipeError(f"more_models must be a list of model names or recipes, not {value!r}")
    slots = tuple(_model_slot(f"more_models[{n}]", m, optional=False) for n, m in enumerate(value))
    if any(isinstance(m, str) and not m.strip() for m in slots):
        raise RecipeError("more_models holds an empty model name")
    return slots


def _slot_to_data(value):
    return value.to_dict() if isinstance(value, Recipe) else value


def _blank_to_none(value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RecipeError(f"expected text, got {value!r}")
    return value.strip()
