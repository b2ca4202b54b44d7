"""The tab's fields: one ordered declaration of (field, label, widget) per value it edits.

Every widget of the tab that holds part of a :class:`~mergers.recipe.Recipe` is
declared once in :data:`FIELDS`, in the order the tab shows them, with the
original SuperMerger's label where it has one. The builder makes the Gradio
components from this list; the handlers turn the values back into a Recipe with
``recipe_from_ui(dict(zip(FIELD_NAMES, values)))``, and a past Recipe fills the
tab with :func:`ui_from_recipe`. No position in a list ever carries meaning.

Names are the Recipe's field names; ``dice.<name>`` are the fields of its
:class:`~mergers.dice.Dice`. ``use_block_weights`` is the one value of the tab
that is not a Recipe field (the original's "use MBW": without it the weight
boxes are ignored). The preview's txt2img settings are :data:`GENERATION_FIELDS`
(names ``gen.<GenerationParams field>``).

This module does not import Gradio: the API and the tests use it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergers.arch.layouts import SD1_BLOCKS
from mergers.dice import DEFAULT_CUSTOM, DICE_MODES, Dice
from mergers.errors import MergeError, RecipeError
from mergers.host import GenerationParams
from mergers.keyfilter import FILTER_CHOICES
from mergers.methods.modes import MODES, calcmodes_for
from mergers.recipe import Recipe

ModelNames = Callable[[str], str]  # a dropdown value → the model name the Recipe stores

DTYPE_CHOICES = ("fp16", "bf16", "fp32", "as model A")
AS_MODEL_A = "as model A"
FILTER_MODE_LABELS = ("Off", "Include", "Exclude")  # the original's radio
UI_ONLY = ("use_block_weights",)
DICE_PREFIX = "dice."
GENERATION_PREFIX = "gen."
# The original's defaults for its two weight boxes: 26 × 0.5 for alpha, 26 × 0.2 for beta.
DEFAULT_WEIGHTS_ALPHA = ",".join(["0.5"] * len(SD1_BLOCKS))
DEFAULT_WEIGHTS_BETA = ",".join(["0.2"] * len(SD1_BLOCKS))
WEIGHTS_INFO = ("BASE,IN00,…,IN11,M00,OUT00,…,OUT11 (20 values for SDXL; Flux: 61 values CLIP,T5,IN,D00,…,D18,"
                "S00,…,S37,OUT; SD3: 28, SD3.5 Large: 42 values CLIP,T5,IN,J00,…,OUT), a preset name, "
                "or 'ALL:0.5, OUT:1'")


@dataclass(frozen=True)
class Widget:
    """Which Gradio component shows a field, with its keyword arguments (valid in Gradio 3.41 and 4)."""

    kind: str  # "dropdown" | "radio" | "slider" | "number" | "textbox" | "checkbox" | "checkboxgroup"
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def default(self) -> Any:
        """The value the widget starts with."""
        return self.options.get("value")


@dataclass(frozen=True)
class Field:
    """One value of the tab: its name, the label the user sees, the widget and how its value converts.

    ``codec`` names an entry of :data:`CODECS`: how a widget value becomes a Recipe value and back.
    """

    name: str
    label: str
    widget: Widget
    codec: str = "plain"

    @property
    def recipe_field(self) -> Optional[str]:
        """The Recipe field this value goes into (``dice`` for the dice's), or None for a UI-only value."""
        if self.name in UI_ONLY:
            return None
        return self.name.split(".", 1)[0]


def _w(kind: str, **options) -> Widget:
    return Widget(kind, options)


def _ratio(value: float, **options) -> Widget:
    """The original's alpha/beta sliders: −1…2 in steps of 0.001."""
    return _w("slider", minimum=-1.0, maximum=2.0, step=0.001, value=value, **options)


def _model_dropdown(role: str) -> Widget:
    """A model list; its value may be a name not (or no longer) listed, as a loaded recipe's."""
    return _w("dropdown", choices=[], value=None, allow_custom_value=True, elem_id=f"supermerger_model_{role}")


FIELDS: tuple[Field, ...] = (
    Field("model_a", "Model A", _model_dropdown("a"), "model"),
    Field("model_b", "Model B", _model_dropdown("b"), "model"),
    Field("model_c", "Model C", _model_dropdown("c"), "model"),
    Field("mode", "Merge Mode", _w("radio", choices=list(MODES.values()), value=MODES["weight_sum"]), "mode"),
    Field("calcmode", "Calculation Mode", _w("radio", choices=calcmodes_for("weight_sum"), value="normal")),
    Field("alpha", "alpha", _ratio(0.5), "float"),
    Field("beta", "beta", _ratio(0.25, interactive=False), "float"),
    Field("gamma", "option(gamma)", _w("slider", minimum=-1.0, maximum=20.0, step=0.1, value=0.3,
                                       interactive=False), "float"),
    Field("seed", "seed (plus random; -1: random)", _w("number", value=-1, precision=0,
                                                        interactive=False), "int"),
    Field("use_block_weights", "use MBW", _w("checkbox", value=False)),
    Field("weights_alpha", "weights for alpha", _w("textbox", value=DEFAULT_WEIGHTS_ALPHA, lines=1,
                                                   info=WEIGHTS_INFO), "text"),
    Field("weights_beta", "weights for beta", _w("textbox", value=DEFAULT_WEIGHTS_BETA, lines=1,
                                                 info=WEIGHTS_INFO), "text"),
    Field("elemental", "Elemental Merge", _w("textbox", value="", lines=2,
                                             placeholder="Blocks:Element:Ratio, Blocks:Element:Ratio, …"), "text"),
    Field("elemental_extended", "SDXL: extended block names (IN411, OUT210…)", _w("checkbox", value=False)),
    Field("include_exclude", "Include/Exclude", _w("radio", choices=list(FILTER_MODE_LABELS), value="Off"),
          "filter_mode"),
    Field("include_exclude_blocks", "Blocks", _w("checkboxgroup", choices=list(FILTER_CHOICES),
                                                 value=[]), "blocks"),
    Field("include_exclude_elements", "Elements", _w("textbox", value="", placeholder="attn2, ff.net"), "text"),
    Field("adjust", "Adjust", _w("textbox", value="", info="IN,OUT,OUT2,Contrast,Brightness,COL1,COL2,COL3"),
          "text"),
    Field("dice.mode", "Random Mode", _w("radio", choices=list(DICE_MODES), value="off")),
    Field("dice.seed", "Random Seed (-1: random)", _w("number", value=-1, precision=0), "int"),
    Field("dice.round", "Round", _w("number", value=3, precision=0, minimum=0), "int"),
    Field("dice.upper", "Upper limit for X, mid point of D", _w("textbox", value=""), "text_keep"),
    Field("dice.lower", "Lower limit for X, range of D", _w("textbox", value=""), "text_keep"),
    Field("dice.upper_clamp", "Upper clamp for X, D", _w("textbox", value=""), "text_keep"),
    Field("dice.lower_clamp", "Lower clamp for X, D", _w("textbox", value=""), "text_keep"),
    Field("dice.custom", "custom", _w("textbox", value=DEFAULT_CUSTOM), "text_keep"),
    Field("dice.alpha", "random alpha", _w("checkbox", value=True)),
    Field("dice.beta", "random beta", _w("checkbox", value=False)),
    Field("dtype", "Precision", _w("radio", choices=list(DTYPE_CHOICES), value=AS_MODEL_A), "dtype"),
    Field("prune", "prune", _w("checkbox", value=False)),
    Field("reset_clip", "Reset CLIP ids", _w("checkbox", value=False)),
    Field("bake_vae", "Bake in VAE (file name)", _w("textbox", value="", placeholder="vae.safetensors"), "text"),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}

GENERATION_FIELDS: tuple[Field, ...] = (
    Field("gen.prompt", "Prompt", _w("textbox", value="", lines=2)),
    Field("gen.negative_prompt", "Negative prompt", _w("textbox", value="", lines=2)),
    Field("gen.steps", "Sampling steps", _w("slider", minimum=1, maximum=150, step=1, value=20), "int"),
    Field("gen.sampler", "Sampling method", _w("textbox", value="Euler a")),
    Field("gen.cfg_scale", "CFG Scale", _w("slider", minimum=1.0, maximum=30.0, step=0.5, value=7.0), "float"),
    Field("gen.width", "Width", _w("slider", minimum=64, maximum=2048, step=8, value=512), "int"),
    Field("gen.height", "Height", _w("slider", minimum=64, maximum=2048, step=8, value=512), "int"),
    Field("gen.seed", "Seed", _w("number", value=-1, precision=0), "int"),
    Field("gen.batch_size", "Batch size", _w("slider", minimum=1, maximum=8, step=1, value=1), "int"),
)
GENERATION_NAMES: tuple[str, ...] = tuple(f.name for f in GENERATION_FIELDS)


# --- codecs: widget value ⇄ Recipe value --------------------------------------------


def _text_to_recipe(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _whole(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


# name → (to the Recipe, to the widget)
CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "plain": (lambda v: v, lambda v: v),
    "float": (float, float),
    "int": (_whole, int),
    "text": (_text_to_recipe, lambda v: v or ""),
    "text_keep": (lambda v: "" if v is None else str(v), lambda v: v),  # the dice's boxes: "" is a value
    "model": (lambda v: v or None, lambda v: v),  # names go through ``models`` in recipe_from_ui
    "mode": (lambda v: v, lambda v: MODES[v]),
    "filter_mode": (lambda v: (v or "off").lower(), lambda v: v.capitalize()),
    "blocks": (lambda v: " ".join(v or ()), lambda v: (v or "").replace(",", " ").split()),
    "dtype": (lambda v: None if v in (None, "", AS_MODEL_A) else v, lambda v: v or AS_MODEL_A),
}


def _decode(f: Field, value: Any) -> Any:
    """A widget value as the Recipe takes it; a RecipeError naming the label when it cannot be."""
    try:
        return CODECS[f.codec][0](value)
    except (TypeError, ValueError, KeyError):
        raise RecipeError(f"{f.label}: {value!r} is not a valid value") from None


def field_value(name: str, values: Mapping[str, Any]) -> Any:
    """One declared field's value as the Recipe takes it (models as they are).

    Example:
        >>> field_value("dtype", {"dtype": "as model A"}) is None
        True
    """
    f = FIELDS_BY_NAME[name]
    if f.codec == "model":
        return values.get(name) or None
    return _decode(f, values.get(name))


def _model_name(f: Field, value: Any, models: ModelNames) -> Optional[str]:
    """A model dropdown's value as the Recipe names it; errors are prefixed with the label (Model A…)."""
    if not value:
        return None
    try:
        return models(str(value))
    except MergeError as error:
        raise type(error)(f"{f.label}: {error}") from None


def recipe_from_ui(values: Mapping[str, Any], *, models: ModelNames = str) -> Recipe:
    """The Recipe the tab's values describe (``values``: field name → widget value).

    ``models`` maps a model dropdown's value to the name the Recipe stores (and may
    refuse it with a MergeError). Without "use MBW" the weight boxes are ignored.

    Example:
        >>> values = {**default_values(), "model_a": "a.safetensors", "model_b": "b.safetensors", "alpha": 0.3}
        >>> recipe_from_ui(values).alpha
        0.3
    """
    missing = [name for name in FIELD_NAMES if name not in values]
    if missing:
        raise RecipeError(f"the tab sent no value for {', '.join(missing)}")
    plain: dict[str, Any] = {}
    for f in FIELDS:
        decoded = _model_name(f, values[f.name], models) if f.codec == "model" else _decode(f, values[f.name])
        plain[f.name] = decoded
    if not plain.pop("use_block_weights"):
        plain["weights_alpha"] = plain["weights_beta"] = None
    dice = {name.removeprefix(DICE_PREFIX): plain.pop(name) for name in FIELD_NAMES if name.startswith(DICE_PREFIX)}
    if not plain["model_a"] or not plain["model_b"]:
        raise RecipeError("choose Model A and Model B")
    return Recipe(**plain, dice=Dice(**dice))


def ui_from_recipe(recipe: Recipe, *, titles: Optional[ModelNames] = None) -> dict[str, Any]:
    """The tab's values that show ``recipe`` (field name → widget value), e.g. for "Load settings from ID".

    ``titles`` maps the Recipe's model names to the dropdowns' values (default: as they are).

    Example:
        >>> recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3)
        >>> recipe_from_ui(ui_from_recipe(recipe)) == recipe
        True
    """
    uses_weights = recipe.weights_alpha is not None or recipe.weights_beta is not None
    values: dict[str, Any] = {}
    for f in FIELDS:
        if f.name == "use_block_weights":
            values[f.name] = uses_weights
        elif f.name.startswith(DICE_PREFIX):
            values[f.name] = CODECS[f.codec][1](getattr(recipe.dice, f.name.removeprefix(DICE_PREFIX)))
        elif f.codec == "model":
            name = getattr(recipe, f.name)
            values[f.name] = (titles or str)(name) if name else None
        else:
            values[f.name] = CODECS[f.codec][1](getattr(recipe, f.name))
    if not uses_weights:  # the boxes keep the original's defaults; "use MBW" off ignores them
        values["weights_alpha"], values["weights_beta"] = DEFAULT_WEIGHTS_ALPHA, DEFAULT_WEIGHTS_BETA
    return values


def default_values() -> dict[str, Any]:
    """Every field's starting value (field name → widget value).

    Example:
        >>> default_values()["mode"]
        'Weight sum'
    """
    return {f.name: f.widget.default for f in FIELDS}


def params_from_ui(values: Mapping[str, Any]) -> GenerationParams:
    """The txt2img settings the generation fields hold (``gen.<name>`` → value).

    Example:
        >>> params_from_ui(ui_from_params(GenerationParams(steps=8))).steps
        8
    """
    params = {}
    for f in GENERATION_FIELDS:
        value = values.get(f.name)
        params[f.name.removeprefix(GENERATION_PREFIX)] = _decode(f, f.widget.default if value is None else value)
    return GenerationParams(**params)


def ui_from_params(params: GenerationParams) -> dict[str, Any]:
    """The generation fields' values for ``params`` (e.g. the host's txt2img defaults).

    Example:
        >>> ui_from_params(GenerationParams(prompt="a cat"))["gen.prompt"]
        'a cat'
    """
    return {f.name: getattr(params, f.name.removeprefix(GENERATION_PREFIX)) for f in GENERATION_FIELDS}


def recipe_fields_in_tab() -> set[str]:
    """The Recipe fields that some declared field edits (``dice`` for the dice's).

    Example:
        >>> "alpha" in recipe_fields_in_tab()
        True
    """
    return {f.recipe_field for f in FIELDS if f.recipe_field is not None}


def dice_fields_in_tab() -> set[str]:
    """The Dice fields the tab edits."""
    return {f.name.removeprefix(DICE_PREFIX) for f in FIELDS if f.name.startswith(DICE_PREFIX)}


def short_model_name(name: Optional[str]) -> str:
    """A model name without folders and extension (and A1111's " [hash]"), for tables.

    Example:
        >>> short_model_name("sub/a.safetensors [0123456789]")
        'a'
    """
    return Path(name.replace("\\", "/")).stem if name else ""
