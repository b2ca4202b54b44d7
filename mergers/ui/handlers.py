"""What the tab's buttons and choices do: plain functions of field values → output values.

Each handler of :class:`TabActions` takes the tab's values as a mapping (field
name → value, see :mod:`mergers.ui.fields`) and returns the outputs it changes
as a mapping (output name → value or ``gr.update(...)``). Gradio is only the
wiring (:mod:`mergers.ui.tab`), so the tests call these directly.

A handler never raises to Gradio: a :class:`~mergers.errors.MergeError` becomes
its message (``str(error)``), and anything unexpected is logged with its
traceback and shown in one line.

Example:
    >>> actions = TabActions(MergeSession(host))
    >>> actions.merge({**default_values(), "model_a": "a.safetensors", "model_b": "b.safetensors"})["message"]
    'a x 0.5 + b x 0.5 (ID 1): 1130 keys merged, swapped into the loaded model, 0.4 s'
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from mergers.arch import (
    FLUX_BLOCKS,
    SD1_BLOCKS,
    SD3_BLOCKS,
    SD3_LARGE_BLOCKS,
    SDXL_BLOCKS,
    block_ids,
    detect_architecture,
    require_supported,
)
from mergers.chain import describe, open_model
from mergers.engine import ProgressCallback
from mergers.errors import MergeError, WeightsError
from mergers.estimate import estimate
from mergers.keyfilter import filter_choices
from mergers.merge import open_sources
from mergers.methods.modes import MODES, calcmodes_for, method_for
from mergers.recipe import Recipe
from mergers.session import MergeSession, file_stem, warnings_text
from mergers.ui.fields import field_value, params_from_ui, recipe_from_ui, short_model_name, ui_from_recipe
from mergers.virtual import save_virtual_checkpoint, virtual_file_name
from mergers.weights import BlockWeights, load_presets, parse_weights

log = logging.getLogger(__name__)

# Output names that are not declared fields.
MESSAGE, GALLERY, INFOTEXT, HISTORY, LAYOUT, ARCH_INFO, METHOD_INFO = (
    "message", "gallery", "infotext", "history_table", "layout", "arch_info", "method_info")
SAVE_NAME, OVERWRITE, HISTORY_ID, HISTORY_SEARCH, HISTORY_MATCH, PRESET = (
    "save_name", "overwrite", "history_id", "history_search", "history_match", "preset")
ALLOW_NON_FINITE = "allow_non_finite"  # the Save section's "write NaN/Inf" checkbox
TABS, MERGE_TAB = "tabs", "merge"
HISTORY_RECIPE = "history_recipe"  # the JSON of a past merge's recipe, to copy
HISTORY_HEADERS = ("ID", "time", "name", "mode", "models")
HISTORY_ROWS = 100  # the original offers 20…100 rows
HIDDEN_FOR_SDXL = tuple(b for b in SD1_BLOCKS if b not in SDXL_BLOCKS)  # IN09–IN11, OUT09–OUT11
# The block sliders in the groups the tab shows or hides as one: (group, its blocks in slider order).
# One slider per block name: Flux and SD3 share CLIP, T5, IN and OUT, SD3 and SD3.5 Large J00–J23.
SLIDER_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("unet", SD1_BLOCKS),  # SD1, SD2, the SDXL refiner and (without IN09–IN11, OUT09–OUT11) SDXL
    ("transformer", ("CLIP", "T5", "IN", "OUT")),  # Flux and SD3: text encoders, input and output layers
    ("flux_double", tuple(b for b in FLUX_BLOCKS if b.startswith("D"))),
    ("flux_single", tuple(b for b in FLUX_BLOCKS if b.startswith("S"))),
    ("sd3_joint", tuple(b for b in SD3_BLOCKS if b.startswith("J"))),
    ("sd3_large_joint", tuple(b for b in SD3_LARGE_BLOCKS if b.startswith("J") and b not in SD3_BLOCKS)),
)
# Every other layout (Qwen-Image, Wan, user and automatic ones) uses a pool of sliders by position, each
# relabelled with its block id when model A is read; 128 covers every shipped layout (Qwen-Image has 63).
GENERIC_SLIDERS = 128
GENERIC_BLOCKS = tuple(f"#{n:03d}" for n in range(GENERIC_SLIDERS))
NAMED_BLOCKS = frozenset(b for _, blocks in SLIDER_GROUPS for b in blocks)
SLIDER_GROUPS += (("any", GENERIC_BLOCKS),)
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")  # what would format inline text
HASH_SUFFIX = re.compile(r"\s*\[[^]]*\]$")  # A1111's title "a.safetensors [0123456789]"


def slider_name(block: str) -> str:
    """The output name of a block's weight slider.

    Example:
        >>> slider_name("IN00")
        'block.IN00'
    """
    return f"block.{block}"


def group_name(group: str) -> str:
    """The output name of a group of block sliders (a column the tab shows or hides).

    Example:
        >>> group_name("flux_double")
        'block_group.flux_double'
    """
    return f"block_group.{group}"


def group_shown(blocks: tuple[str, ...], layout: str) -> bool:
    """Whether a slider group holds any block of ``layout`` (the positional group: for layouts without named sliders).

    Example:
        >>> group_shown(("CLIP", "T5", "IN", "OUT"), "sdxl"), group_shown(GENERIC_BLOCKS, "qwen_image")
        (False, True)
    """
    named = uses_named_sliders(layout)
    if blocks == GENERIC_BLOCKS:
        return not named
    return named and not set(blocks).isdisjoint(block_ids(layout))


def uses_named_sliders(layout: str) -> bool:
    """Whether every block of ``layout`` has a slider of its own name (SD1/SD2, SDXL, Flux, SD3).

    Example:
        >>> uses_named_sliders("flux"), uses_named_sliders("wan")
        (True, False)
    """
    return set(block_ids(layout)) <= NAMED_BLOCKS


def layout_sliders(layout: str) -> tuple[str, ...]:
    """The output names of the sliders holding ``layout``'s blocks, in block order.

    Example:
        >>> layout_sliders("qwen_image")[:2], layout_sliders("sd1")[:2]
        (('block.#000', 'block.#001'), ('block.BASE', 'block.IN00'))
    """
    ids = block_ids(layout)
    if uses_named_sliders(layout):
        return tuple(slider_name(block) for block in ids)
    if len(ids) > GENERIC_SLIDERS:
        raise WeightsError(f"this layout has {len(ids)} blocks, more than the tab's {GENERIC_SLIDERS} sliders: "
                           "type its weights in the weights box (e.g. 'ALL:0.5, D00-D09:1')")
    return tuple(slider_name(block) for block in GENERIC_BLOCKS[:len(ids)])


SLIDER_NAMES = tuple(slider_name(b) for _, blocks in SLIDER_GROUPS for b in blocks)  # every layout's sliders
# What model A's layout changes: which groups are shown, and which sliders within them.
VISIBILITY_OUTPUTS = (*(group_name(g) for g, _ in SLIDER_GROUPS), *SLIDER_NAMES)


def slider_visibility(layout: str) -> dict[str, Any]:
    """Show the slider groups of ``layout`` and within them its blocks' sliders, hide the other groups.

    A hidden group's sliders are left as they are: they are out of sight with it, and get their own
    visibility when a layout shows the group again.

    Example:
        >>> slider_visibility("sdxl")["block.IN09"]["visible"], "block.D00" in slider_visibility("sdxl")
        (False, False)
    """
    shown = set(block_ids(layout))
    updates: dict[str, Any] = {}
    for group, blocks in SLIDER_GROUPS:
        visible = group_shown(blocks, layout)
        updates[group_name(group)] = gr.update(visible=visible)
        if visible and blocks == GENERIC_BLOCKS:
            updates.update(_generic_slider_labels(layout))
        elif visible:
            updates.update({slider_name(b): gr.update(visible=b in shown) for b in blocks})
    return updates


def _generic_slider_labels(layout: str) -> dict[str, Any]:
    """The positional sliders relabelled with ``layout``'s block ids; the ones past its last block hidden."""
    ids = block_ids(layout)[:GENERIC_SLIDERS]
    return {slider_name(slot): gr.update(visible=n < len(ids), label=ids[n] if n < len(ids) else slot)
            for n, slot in enumerate(GENERIC_BLOCKS)}


def as_message(text: str) -> str:
    """``text`` as Markdown that shows it literally (file names hold ``_`` and ``*``).

    Example:
        >>> as_message("a_b")
        'a\\\\_b'
    """
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def shows_errors(handler: Callable[..., dict]) -> Callable[..., dict]:
    """Turn any error of ``handler`` into its ``message`` output: the error's text, never a traceback."""
    @functools.wraps(handler)
    def run(*args, **kwargs) -> dict:
        try:
            return handler(*args, **kwargs)
        except MergeError as error:
            return {MESSAGE: as_message(str(error))}
        except Exception as error:  # a bug: keep the tab alive, the traceback goes to the log
            log.exception("%s failed", handler.__name__)
            return {MESSAGE: as_message(f"unexpected error ({type(error).__name__}): {error}; see the log")}
    return run


class TabActions:
    """The tab's handlers around one :class:`MergeSession`."""

    def __init__(self, session: MergeSession):
        self.session = session
        self.host = session.host

    # --- models -------------------------------------------------------------------

    def model_titles(self) -> list[str]:
        """The titles of the host's checkpoints, for the three dropdowns."""
        return [entry.title for entry in self.host.list_models()]

    def model_name(self, title: str) -> str:
        """A dropdown value as the Recipe stores it; unknown models are refused now, not mid-merge."""
        self.host.resolve(title)
        return title

    def title_for(self, name: str) -> str:
        """The dropdown title of a Recipe's model name (a title, file name, path or short hash)."""
        wanted = HASH_SUFFIX.sub("", Path(name.replace("\\", "/")).name)
        for entry in self.host.list_models():
            if name in (entry.title, str(entry.path), entry.shorthash) or entry.path.name == wanted:
                return entry.title
        return name

    @shows_errors
    def refresh_models(self, values: Mapping[str, Any]) -> dict:
        """Reload the checkpoint list into the three dropdowns."""
        titles = self.model_titles()
        return {name: gr.update(choices=titles) for name in ("model_a", "model_b", "model_c")}

    @shows_errors
    def change_model_a(self, values: Mapping[str, Any]) -> dict:
        """Read model A's header: its architecture decides the sliders shown and the block choices."""
        title = values.get("model_a")
        if not title:
            return self._layout_outputs("sd1", "", values)
        with open_model(title, self.host.resolve) as checkpoint:  # a saved recipe is read as a model too
            arch = detect_architecture(checkpoint.shapes, checkpoint.metadata, source=checkpoint.name)
        require_supported(arch, source=checkpoint.name)
        return self._layout_outputs(arch.layout, f"Model A: {arch.label}", values)

    def _layout_outputs(self, layout: str, label: str, values: Mapping[str, Any]) -> dict:
        choices = list(filter_choices(layout))
        chosen = [b for b in values.get("include_exclude_blocks") or () if b in choices]
        outputs = {LAYOUT: layout, ARCH_INFO: as_message(label),
                   "include_exclude_blocks": gr.update(choices=choices, value=chosen)}
        return {**outputs, **slider_visibility(layout)}

    # --- mode ---------------------------------------------------------------------

    @shows_errors
    def change_mode(self, values: Mapping[str, Any]) -> dict:
        """Offer the calculation modes of the mode; enable the sliders and model C the method uses."""
        return method_updates(values.get("mode") or MODES["weight_sum"], values.get("calcmode"))

    # --- block weights ------------------------------------------------------------

    @shows_errors
    def set_weights(self, values: Mapping[str, Any], *, target: str) -> dict:
        """"Set": the sliders of the layout's blocks → the weights box ``target``."""
        layout = values.get(LAYOUT) or "sd1"
        numbers = [values[name] for name in layout_sliders(layout)]
        return {target: BlockWeights(layout, tuple(numbers)).as_text()}

    @shows_errors
    def read_weights(self, values: Mapping[str, Any], *, source: str) -> dict:
        """"Read": the weights box ``source`` (numbers, preset or readable form) → the sliders."""
        return self._sliders(values.get(source) or "", values.get(LAYOUT) or "sd1")

    @shows_errors
    def apply_preset(self, values: Mapping[str, Any]) -> dict:
        """A preset picked from the list → the sliders (then "Set alpha" or "Set beta" writes them)."""
        preset = values.get(PRESET)
        return self._sliders(preset, values.get(LAYOUT) or "sd1") if preset else {}

    def _sliders(self, text: str, layout: str) -> dict:
        weights = parse_weights(text, layout)
        return dict(zip(layout_sliders(layout), weights.values))

    # --- merging ------------------------------------------------------------------

    def recipe(self, values: Mapping[str, Any]) -> Recipe:
        """The Recipe the tab describes, its models checked against the host's list."""
        return recipe_from_ui(values, models=self.model_name)

    @shows_errors
    def merge(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Merge into the loaded model; the message is the outcome's summary (its warnings included).

        With "write NaN/Inf" ticked, a merge holding NaN/Inf is kept for Save (never swapped in)."""
        recipe = self.recipe(values)
        cost = self.estimate_text(recipe)
        outcome = self.session.merge(recipe, on_progress=on_progress,
                                     allow_non_finite=bool(values.get(ALLOW_NON_FINITE)))
        return {MESSAGE: as_message(f"{outcome.summary}\n{cost}"), HISTORY: self.history_rows()}

    def estimate_text(self, recipe: Recipe) -> str:
        """The merge's cost from the inputs' headers (nothing is read): bytes, peak RAM/VRAM, time."""
        with open_sources(recipe, self.host.resolve) as sources:
            return estimate(recipe, sources).text()

    @shows_errors
    def load_model_a(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Model A is a saved recipe (a virtual checkpoint): merge it into the loaded model on its own."""
        if not values.get("model_a"):
            raise MergeError("pick a saved recipe (a .recipe.json model) as model A first")
        outcome = self.session.load_virtual(values["model_a"], on_progress=on_progress)
        return {MESSAGE: as_message(f"loaded the saved recipe: {outcome.summary}"), HISTORY: self.history_rows()}

    @shows_errors
    def use_merge_as_model_a(self, values: Mapping[str, Any]) -> dict:
        """Chain by hand: keep the current merge as a saved recipe (a virtual checkpoint, a few KB)
        beside the checkpoints and pick it as model A, so the next merge takes its result as A."""
        current = self.session.current
        if current is None or current.recipe is None:
            raise MergeError("nothing to chain: merge first, then use the merge as model A")
        name = file_stem(current.name)
        path = save_virtual_checkpoint(current.recipe, self.host.models_dir / virtual_file_name(name), overwrite=True)
        titles = self.model_titles()
        title = self.title_for(str(path))
        return {"model_a": gr.update(choices=titles, value=title), "model_b": gr.update(choices=titles),
                "model_c": gr.update(choices=titles),
                MESSAGE: as_message(f"model A is now the merge {describe(current.recipe)}, kept as {path.name}: "
                                    "it is merged key by key when used, nothing else is written")}

    @shows_errors
    def merge_and_generate(self, values: Mapping[str, Any], *,
                           on_progress: Optional[ProgressCallback] = None) -> dict:
        """Merge, then generate a preview; a failed preview still reports the merge (and how to restore)."""
        outcome = self.session.merge(self.recipe(values), on_progress=on_progress,
                                     allow_non_finite=bool(values.get(ALLOW_NON_FINITE)))
        outputs = {MESSAGE: as_message(outcome.summary), HISTORY: self.history_rows()}
        if outcome.refused:  # not in the model: a preview would show the checkpoint, not this merge
            return outputs
        generated = self.generate(values)
        generated[MESSAGE] = outputs[MESSAGE] + "\n\n" + generated[MESSAGE]
        return {**outputs, **generated}

    @shows_errors
    def generate(self, values: Mapping[str, Any]) -> dict:
        """txt2img with what is loaded, the generation fields overriding the host's defaults."""
        generated = self.session.generate(params_from_ui(values))
        count = len(generated.images)
        return {GALLERY: list(generated.images), INFOTEXT: generated.infotext,
                MESSAGE: as_message(f"generated {count} image{'s' if count != 1 else ''}")}

    @shows_errors
    def stop(self, values: Optional[Mapping[str, Any]] = None) -> dict:
        """Ask the running merge or save to stop (it puts back what it changed)."""
        self.session.stop()
        return {MESSAGE: as_message("stopping: the running merge or save is cancelled and undone")}

    @shows_errors
    def restore(self, values: Optional[Mapping[str, Any]] = None) -> dict:
        """Put the loaded model's original weights back."""
        restored = self.session.restore()
        text = f"restored {restored} tensors of the original model" if restored else "nothing to restore"
        return {MESSAGE: as_message(text)}

    @shows_errors
    def save(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Write the current merge under the models folder, in the chosen precision."""
        name = (values.get(SAVE_NAME) or "").strip() or self.default_file_name()
        path = self.session.save(name, dtype=field_value("dtype", values), prune=bool(values.get("prune")),
                                 overwrite=bool(values.get(OVERWRITE)), bake_vae=field_value("bake_vae", values),
                                 on_progress=on_progress, allow_non_finite=bool(values.get(ALLOW_NON_FINITE)))
        return {MESSAGE: as_message(f"saved {path}" + warnings_text(self.session.save_warnings))}

    def default_file_name(self) -> str:
        """The current merge's name as a file name, as the original makes it."""
        if self.session.current is None:
            raise MergeError("nothing to save: merge first")
        return file_stem(self.session.current.name)

    # --- history ------------------------------------------------------------------

    @shows_errors
    def search_history(self, values: Mapping[str, Any]) -> dict:
        """The history table, filtered by the search words ("and": all of them; "or": any)."""
        return {HISTORY: self.history_rows(values.get(HISTORY_SEARCH) or "", values.get(HISTORY_MATCH) or "and")}

    def history_rows(self, text: str = "", match: str = "and") -> list[list[Any]]:
        """Rows of ID, time, name, mode and models, newest first."""
        history = self.session.history
        entries = history.search(text, match_all=match != "or", limit=HISTORY_ROWS)
        rows = [[e.id, e.time, e.name + _warned(e.extra), _mode_text(e.recipe), _models_text(e.recipe)]
                for e in entries]
        return rows or [["", "", "", "", ""]]  # an empty table loses its columns in Gradio 3

    @shows_errors
    def show_history_recipe(self, values: Mapping[str, Any]) -> dict:
        """"Show recipe": the JSON of that merge's recipe (the page's copy button takes it from there)."""
        entry = self.session.recipe_from_history(_history_id(values.get(HISTORY_ID)))
        return {HISTORY_RECIPE: entry.recipe.to_json(), MESSAGE: as_message(f"the recipe of ID {entry.id}")}

    @shows_errors
    def load_history(self, values: Mapping[str, Any]) -> dict:
        """"Load settings from ID" (-1 = the last merge): fill the tab with that merge's recipe."""
        entry = self.session.recipe_from_history(_history_id(values.get(HISTORY_ID)))
        outputs: dict[str, Any] = ui_from_recipe(entry.recipe, titles=self.title_for)
        outputs.update(method_updates(outputs["mode"], outputs["calcmode"], keep=outputs))
        outputs[MESSAGE] = as_message(f"loaded the settings of ID {entry.id}: {entry.name}"
                                      + warnings_text(entry.extra.get("warnings") or ()))
        outputs[TABS] = gr.update(selected=MERGE_TAB)  # show what was loaded
        return outputs


def method_updates(mode: str, calcmode: Optional[str], *, keep: Optional[Mapping[str, Any]] = None) -> dict:
    """The calc-mode choices of ``mode`` and which of beta, gamma, seed and model C its method uses.

    ``keep`` holds values to set at the same time (a loaded recipe's), so an update never drops them.

    Example:
        >>> method_updates("Add difference", "cosineA")["calcmode"]["value"]
        'normal'
    """
    choices = calcmodes_for(mode)
    calcmode = calcmode if calcmode in choices else "normal"
    method = method_for(mode, calcmode)
    used = {"beta": method.uses_beta, "gamma": "gamma" in method.params, "seed": "seed" in method.params,
            "model_c": method.models == 3}
    updates = {name: gr.update(interactive=on, **_kept(name, keep or {})) for name, on in used.items()}
    updates["calcmode"] = gr.update(choices=choices, value=calcmode)
    updates[METHOD_INFO] = as_message(f"{method.label}: {method.formula}")
    return updates


def _history_id(value: Any) -> int:
    """The ID box's value as an ID; empty means -1, the last merge."""
    if value in (None, ""):
        return -1
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():
        raise MergeError(f"Load settings from ID: {value!r} is not a whole number (-1 is the last merge)")
    return int(number)


def _kept(name: str, keep: Mapping[str, Any]) -> dict:
    return {"value": keep[name]} if name in keep else {}


def _warned(extra: Mapping[str, Any]) -> str:
    """A history row's mark for a merge that had warnings ("Load settings" shows them)."""
    count = len(extra.get("warnings") or ())
    return f" ⚠ {count} warning{'s' if count != 1 else ''}" if count else ""


def _mode_text(recipe: Recipe) -> str:
    label = MODES[recipe.mode]
    return label if recipe.calcmode == "normal" else f"{label} ({recipe.calcmode})"


def _models_text(recipe: Recipe) -> str:
    return ", ".join(short_model_name(m) for m in (recipe.model_a, recipe.model_b, recipe.model_c) if m)


def preset_names() -> list[str]:
    """The block-weight presets for the dropdown: those with the 26 values of the SD1 layout."""
    count = len(SD1_BLOCKS)
    return [name for name, text in load_presets().items() if len(text.split(",")) == count]

