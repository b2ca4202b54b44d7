"""The SuperMerger tab: sections laid out, then their events bound to the handlers.

``build_tab(session)`` returns a ``gr.Blocks`` for A1111's ``on_ui_tabs`` (and
Forge's); ``tab_contents`` lays the same tab into whatever Blocks is open, for
the standalone page. Runs on Gradio 3.41 and 4.

Example:
    >>> tab = build_tab(MergeSession(host))
    >>> script_callbacks.on_ui_tabs(lambda: [(tab, "SuperMerger", "supermerger")])
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from mergers.session import MergeSession
from mergers.ui import sections
from mergers.ui.fields import FIELD_NAMES, GENERATION_NAMES
from mergers.ui.handlers import (
    ALLOW_NON_FINITE,
    ARCH_INFO,
    GALLERY,
    HISTORY,
    HISTORY_ID,
    HISTORY_MATCH,
    HISTORY_RECIPE,
    HISTORY_SEARCH,
    INFOTEXT,
    LAYOUT,
    MERGE_TAB,
    MESSAGE,
    METHOD_INFO,
    OVERWRITE,
    PRESET,
    SAVE_NAME,
    SLIDER_NAMES,
    TABS,
    VISIBILITY_OUTPUTS,
    TabActions,
)
from mergers.ui.license_panel import bind_license_panel, license_section
from mergers.ui.sections import Widgets

log = logging.getLogger(__name__)

# Tabs that live beside their feature: (label, "module:function"); the function lays
# its tab out in the open gr.Tab and binds its own events, given the session.
FEATURE_TABS: tuple[tuple[str, str], ...] = (
    ("XYZ plot", "mergers.ui.xyz_tab:xyz_tab"),
    ("LoRA", "mergers.ui.lora_tab:lora_tab"),
    ("Analysis", "mergers.ui.analysis_tab:analysis_tab"),
    ("Auto-merge", "mergers.ui.search_tab:search_tab"),
)

METHOD_OUTPUTS = ("calcmode", "beta", "gamma", "seed", "model_c", METHOD_INFO, MESSAGE)


def build_tab(session: MergeSession) -> gr.Blocks:
    """The whole tab as its own Blocks.

    Example:
        >>> blocks = build_tab(MergeSession(host))
    """
    with gr.Blocks(analytics_enabled=False) as tab:
        tab_contents(session)
    return tab


def tab_contents(session: MergeSession, feature_tabs: tuple[tuple[str, str], ...] = FEATURE_TABS) -> Widgets:
    """Lay the tab out in the open Blocks and bind its events; returns the components by name."""
    actions = TabActions(session)
    w: Widgets = {LAYOUT: gr.State("sd1")}
    with gr.Tabs(elem_id="supermerger_tabs") as w[TABS]:  # style.css and javascript/ scope to it
        with gr.Tab("Merge", id=MERGE_TAB):
            _merge_tab(w, actions)
        for label, target in dict(feature_tabs).items():
            with gr.Tab(label, id=label.lower().replace(" ", "_")):
                _feature(target)(session)
        with gr.Tab("History", id="history"):
            sections.history_section(w, actions.history_rows())
    _bind_all(w, actions)
    return w


def _feature(target: str) -> Callable[[MergeSession], Any]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _merge_tab(w: Widgets, actions: TabActions) -> None:
    """Settings on the left, buttons, message and preview on the right."""
    with gr.Row():
        with gr.Column(scale=3):
            sections.models_section(w, actions.model_titles())
            sections.mode_section(w)
            sections.block_weights_section(w)
            sections.key_options_section(w)
            sections.dice_section(w)
        with gr.Column(scale=2):
            sections.buttons_section(w)
            license_section(w, elem_id="supermerger_license")
            sections.output_section(w)
            sections.save_section(w)
            sections.generation_section(w, actions.host.default_generation())


def bind(event: Callable, handler: Callable[..., dict], w: Widgets, inputs: Sequence[str],
         outputs: Sequence[str], *, progress: bool = False, queue: bool = True) -> None:
    """Bind ``handler`` (values by name → outputs by name) to a Gradio ``event``.

    Gradio hands a set of inputs over as one {component: value} dict in 3.41 and 4
    alike; it is renamed to field names here, and the handler's named outputs back
    to components. ``progress`` passes an ``on_progress`` that drives Gradio's bar.
    """
    names = {w[name]: name for name in inputs}
    targets = [w[name] for name in outputs]

    def deliver(result: dict) -> dict:
        unbound = set(result) - set(outputs)
        if unbound:  # a wiring slip: say so rather than lose the value silently
            log.warning("%s: outputs %s are not bound to this event", getattr(handler, "__name__", handler),
                        ", ".join(sorted(unbound)))
        return {w[name]: value for name, value in result.items() if name in outputs}

    if progress:
        def run(data, progress=gr.Progress()):  # noqa: B008 - Gradio finds its progress bar by this default
            return deliver(handler(_named(data, names), on_progress=_reporter(progress)))
    elif names:
        def run(data):
            return deliver(handler(_named(data, names)))
    else:
        def run():
            return deliver(handler({}))
    # api_name=False: the tab's events are no HTTP API (that is mergers' own API), and Gradio 4.44
    # fails to describe some of their components with recent pydantic versions.
    event(run, inputs=set(names) if names else None, outputs=targets, queue=queue, api_name=False)


def _named(data: dict, names: dict) -> dict[str, Any]:
    return {names[component]: value for component, value in data.items()}


def _reporter(progress) -> Callable[[int, int, str], None]:
    def on_progress(done: int, total: int, key: str) -> None:
        progress((done, total), desc="merging")
    return on_progress


def _bind_all(w: Widgets, actions: TabActions) -> None:
    _bind_merging(w, actions)
    _bind_choices(w, actions)
    _bind_weights(w, actions)
    _bind_history(w, actions)
    bind_license_panel(w, actions.session)


def _bind_merging(w: Widgets, actions: TabActions) -> None:
    """Merge, Merge and Gen, Gen, Stop (unqueued, so it runs beside a merge), Restore, Save."""
    everything = FIELD_NAMES + GENERATION_NAMES
    bind(w["merge"].click, actions.merge, w, (*FIELD_NAMES, ALLOW_NON_FINITE), (MESSAGE, HISTORY), progress=True)
    bind(w["merge_and_gen"].click, actions.merge_and_generate, w, (*everything, ALLOW_NON_FINITE),
         (MESSAGE, HISTORY, GALLERY, INFOTEXT), progress=True)
    bind(w["gen"].click, actions.generate, w, GENERATION_NAMES, (MESSAGE, GALLERY, INFOTEXT))
    bind(w["stop"].click, actions.stop, w, (), (MESSAGE,), queue=False)
    bind(w["restore"].click, actions.restore, w, (), (MESSAGE,))
    bind(w["save"].click, actions.save, w, (SAVE_NAME, "dtype", "prune", OVERWRITE, "bake_vae", ALLOW_NON_FINITE),
         (MESSAGE,), progress=True)


def _bind_choices(w: Widgets, actions: TabActions) -> None:
    """Mode → calc modes; model A → its architecture; refresh → the model lists."""
    for name in ("mode", "calcmode"):
        bind(w[name].change, actions.change_mode, w, ("mode", "calcmode"), METHOD_OUTPUTS)
    layout_outputs = (LAYOUT, ARCH_INFO, "include_exclude_blocks", MESSAGE, *VISIBILITY_OUTPUTS)
    bind(w["model_a"].change, actions.change_model_a, w, ("model_a", "include_exclude_blocks"), layout_outputs)
    bind(w["refresh_models"].click, actions.refresh_models, w, (), ("model_a", "model_b", "model_c", MESSAGE))
    bind(w["use_merge_as_a"].click, actions.use_merge_as_model_a, w, (), ("model_a", "model_b", "model_c", MESSAGE))
    bind(w["load_model_a"].click, actions.load_model_a, w, ("model_a",), (MESSAGE, HISTORY), progress=True)


def _bind_weights(w: Widgets, actions: TabActions) -> None:
    """Set (sliders → box) and Read (box → sliders) for alpha and beta; a preset → the sliders."""
    for side in ("alpha", "beta"):
        box = f"weights_{side}"
        bind(w[f"set_{side}"].click, functools.partial(actions.set_weights, target=box), w, (*SLIDER_NAMES, LAYOUT),
             (box, MESSAGE))
        bind(w[f"read_{side}"].click, functools.partial(actions.read_weights, source=box), w, (box, LAYOUT),
             (*SLIDER_NAMES, MESSAGE))
    bind(w[PRESET].change, actions.apply_preset, w, (PRESET, LAYOUT), (*SLIDER_NAMES, MESSAGE))


def _bind_history(w: Widgets, actions: TabActions) -> None:
    """Search and reload the table; "Load settings" fills the Merge tab."""
    search = (HISTORY_SEARCH, HISTORY_MATCH)
    bind(w["history_reload"].click, actions.search_history, w, search, (HISTORY, MESSAGE))
    bind(w[HISTORY_SEARCH].submit, actions.search_history, w, search, (HISTORY, MESSAGE))
    bind(w["history_load"].click, actions.load_history, w, (HISTORY_ID,), (*FIELD_NAMES, METHOD_INFO, MESSAGE, TABS))
    bind(w["history_show"].click, actions.show_history_recipe, w, (HISTORY_ID,), (HISTORY_RECIPE, MESSAGE))


