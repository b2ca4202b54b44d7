"""The XYZ plot tab: a base merge, three axes, options; check, run, reserve, stop, Run Rand.

``xyz_tab(session)`` lays the tab out inside an open ``gr.Tab`` and binds its
events (``tab_contents(session, feature_tabs=(("XYZ plot", "mergers.ui.xyz_tab:xyz_tab"),))``).
The handlers are :class:`XyzActions` methods: values by name in, outputs by name
out, errors shown as messages. Runs on Gradio 3.41 and 4.

Example:
    >>> with gr.Blocks():
    ...     tab_contents(session, feature_tabs=(("XYZ plot", "mergers.ui.xyz_tab:xyz_tab"),))
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from mergers.dice import DICE_MODES, Dice
from mergers.engine import ProgressCallback
from mergers.errors import MergeError
from mergers.host import GenerationParams
from mergers.methods import CALCMODES, MODES
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.ui.handlers import MESSAGE, as_message, shows_errors
from mergers.ui.license_panel import bind_license_panel, license_section
from mergers.ui.tab import bind
from mergers.xyz.axes import NONE, TYPE_NAMES, XyzError
from mergers.xyz.outputs import plot_grids, save_outputs
from mergers.xyz.plan import (
    AxisSpec,
    PlotOptions,
    PlotSpec,
    XyzPlan,
    build_plan,
    check_recipes,
    context_for,
    random_spec,
)
from mergers.xyz.run import PlotQueue, PlotResult, PlotRunner

GRIDS = "xyz.grids"
QUEUE = "xyz.queue"
BASE_EXTRA = "xyz.base_extra"  # recipe fields loaded from history that the tab has no widget for
QUEUE_HEADERS = ("ID", "status", "X", "Y", "Z", "cells", "merges")
# The options checkbox group: label → PlotOptions field.
OPTION_LABELS = {"swap X/Y": "swap_xy", "save each merged model": "save_models", "save CSV": "save_csv",
                 "save animated GIF": "save_gif", "difference view": "difference",
                 "restore the model after the plot": "restore"}
BASE_FIELDS = ("model_a", "model_b", "model_c", "mode", "calcmode", "alpha", "beta", "weights_alpha",
               "weights_beta", "dice_mode", "dice_seed")
GENERATION_FIELDS = ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "width", "height", "seed")
AXIS_FIELDS = tuple(f"{axis}_{part}" for axis in "xyz" for part in ("type", "values"))
PLOT_FIELDS = (*BASE_FIELDS, BASE_EXTRA, *(f"gen.{name}" for name in GENERATION_FIELDS), *AXIS_FIELDS, "options")
AXIS_HINT = ("alpha/beta/seed/models/calcmode: comma list · mbw, adjust, prompt: one per line (preset names "
             "allowed; 'mbw alpha and beta': pairs of lines) · elemental: blocks separated by a blank line · "
             "pinpoint blocks: 'IN01, OUT03-OUT06, NOT M00' with alpha or beta on another axis · random: a count")


def grids_folder(session: MergeSession) -> Path:
    """Where grids go: the host's grids folder when it names one, else ``data_dir/xyz``."""
    folder = getattr(session.host, "grids_dir", None)
    return Path(folder) if folder else Path(session.host.data_dir) / "xyz"


class XyzActions:
    """The XYZ tab's handlers around one session (one runner, one reservation queue)."""

    def __init__(self, session: MergeSession, *, folder: Path | None = None):
        self.session = session
        self.folder = folder or grids_folder(session)
        self.runner = PlotRunner(session)
        self.queue = PlotQueue()
        self._running = threading.Lock()

    # building --------------------------------------------------------------------------------------

    def spec(self, values: Mapping[str, Any], *, random_draws: int | None = None) -> PlotSpec:
        recipe = base_recipe(values)
        generation = generation_params(values, self.session.host.default_generation())
        options = PlotOptions(**{OPTION_LABELS[label]: True for label in values.get("options") or ()})
        if random_draws is not None:
            return random_spec(recipe, generation, random_draws, options)
        axes = [AxisSpec(values.get(f"{axis}_type") or NONE, values.get(f"{axis}_values") or "") for axis in "xyz"]
        return PlotSpec(recipe, generation, *axes, options=options)

    def plan(self, spec: PlotSpec) -> XyzPlan:
        resolve = self.session.host.resolve
        plan = build_plan(spec, context_for(spec.recipe, resolve, self.session.history))
        check_recipes(plan, resolve)
        return plan

    # events ----------------------------------------------------------------------------------------

    @shows_errors
    def check(self, values: Mapping[str, Any]) -> dict:
        plan = self.plan(self.spec(values))
        return {MESSAGE: as_message(f"{len(plan.cells)} cells, {plan.merges} merges "
                                    f"({plan.partial_merges} re-merge only the keys whose ratio changed)")}

    @shows_errors
    def run(self, values: Mapping[str, Any], *, on_progress: ProgressCallback | None = None) -> dict:
        return self._run_plan(self.plan(self.spec(values)), on_progress)

    @shows_errors
    def run_random(self, values: Mapping[str, Any], *, on_progress: ProgressCallback | None = None) -> dict:
        draws = int(values.get("random_draws") or 0)
        if draws < 1:
            raise XyzError(f"Run Rand needs a number of draws of at least 1, not {values.get('random_draws')!r}")
        return self._run_plan(self.plan(self.spec(values, random_draws=draws)), on_progress)

    @shows_errors
    def reserve(self, values: Mapping[str, Any]) -> dict:
        item = self.queue.reserve(self.plan(self.spec(values)))
        return {MESSAGE: as_message(f"reserved plot {item.id}"), QUEUE: self.queue_rows()}

    @shows_errors
    def run_queue(self, values: Mapping[str, Any], *, on_progress: ProgressCallback | None = None) -> dict:
        with self._exclusive():
            done = self.queue.run_all(self.runner, on_cell=_cell_reporter(on_progress))
        images, messages = [], []
        for item in done:
            if item.result is not None:
                images += self._finish(item.result)[0]
            messages.append(f"plot {item.id}: {item.status}")
        text = "; ".join(messages) or "no reserved plot is waiting"
        return {MESSAGE: as_message(text), GRIDS: images, QUEUE: self.queue_rows()}

    @shows_errors
    def delete_reservation(self, values: Mapping[str, Any]) -> dict:
        self.queue.remove(int(values.get("reservation_id") or -1))
        return {MESSAGE: "", QUEUE: self.queue_rows()}

    def stop(self, values: Mapping[str, Any] | None = None) -> dict:
        self.runner.stop()
        return {MESSAGE: "stopping after the current cell…"}

    @shows_errors
    def load_base(self, values: Mapping[str, Any]) -> dict:
        """Fill the base merge from a history entry (-1 = the last merge)."""
        entry = self.session.recipe_from_history(int(values.get("base_id") or -1))
        return {**base_values(entry.recipe), MESSAGE: as_message(f"base merge: ID {entry.id} {entry.name}")}

    def queue_rows(self) -> list[list[Any]]:
        rows = [[item.id, item.status, *(_axis_text(axis) for axis in item.plan.axes), len(item.plan.cells),
                 item.plan.merges] for item in self.queue.items()]
        return rows or [["", "no reservation", "", "", "", "", ""]]

    # running ---------------------------------------------------------------------------------------

    def _run_plan(self, plan: XyzPlan, on_progress: ProgressCallback | None) -> dict:
        with self._exclusive():
            result = self.runner.run(plan, on_cell=_cell_reporter(on_progress))
        images, paths = self._finish(result)
        where = f"; saved {paths[0].parent}" if paths else ""
        return {MESSAGE: as_message(result.summary + where), GRIDS: images}

    def _finish(self, result: PlotResult) -> tuple[list, list[Path]]:
        grids = plot_grids(result) if result.cells else []
        paths = save_outputs(result, grids, self.folder) if grids else []
        return [grid.image for grid in grids], paths

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._running.acquire(blocking=False):
            raise MergeError("an XYZ plot is already running; wait for it or press Stop")
        try:
            yield
        finally:
            self._running.release()


def _cell_reporter(on_progress: ProgressCallback | None):
    if on_progress is None:
        return None
    return lambda done, total, cell: on_progress(done, total, f"cell {done} of {total}")


def _axis_text(axis) -> str:
    return f"{axis.type}: {' | '.join(v.label for v in axis.values)}" if axis.active else ""


def base_recipe(values: Mapping[str, Any]) -> Recipe:
    """The base merge from the tab's few recipe widgets plus the fields a history entry brought.

    Example:
        >>> base_recipe({"model_a": "a", "model_b": "b", "mode": "Weight sum", "alpha": 0.3}).alpha
        0.3
    """
    extra = json.loads(values.get(BASE_EXTRA) or "{}")
    dice = Dice(**{**extra.pop("dice", {}), "mode": values.get("dice_mode") or "off",
                   "seed": int(values.get("dice_seed") if values.get("dice_seed") is not None else -1)})
    fields = {name: values.get(name) for name in ("model_a", "model_b", "model_c", "weights_alpha", "weights_beta")}
    if not fields["model_a"] or not fields["model_b"]:
        raise XyzError("choose Model A and Model B for the base merge")
    return Recipe(**{**extra, **fields, "mode": values.get("mode") or "Weight sum",
                     "calcmode": values.get("calcmode") or "normal", "alpha": values.get("alpha", 0.5),
                     "beta": values.get("beta", 0.25), "dice": dice})


def base_values(recipe: Recipe) -> dict[str, Any]:
    """The tab's base widgets (and the hidden extra fields) showing ``recipe``."""
    data = recipe.to_dict()
    shown = {name: data.pop(name) for name in ("model_a", "model_b", "model_c", "calcmode", "alpha", "beta",
                                                "weights_alpha", "weights_beta")}
    shown["mode"] = MODES[data.pop("mode")]
    dice = data.pop("dice")
    shown["dice_mode"], shown["dice_seed"] = dice.pop("mode"), dice.pop("seed")
    data = {k: v for k, v in data.items() if k not in ("format", "version")}
    return {**shown, BASE_EXTRA: json.dumps({**data, "dice": dice})}


def generation_params(values: Mapping[str, Any], defaults: GenerationParams) -> GenerationParams:
    """txt2img settings from the tab's generation widgets (the host's defaults where empty)."""
    chosen = {}
    for name in GENERATION_FIELDS:
        value = values.get(f"gen.{name}")
        if value is not None and value != "":
            chosen[name] = type(getattr(defaults, name))(value)
    return GenerationParams(**{**defaults.__dict__, **chosen})


def xyz_tab(session: MergeSession) -> None:
    """Lay the XYZ tab out in the open ``gr.Tab`` and bind its events."""
    actions = XyzActions(session)
    w: dict[str, Any] = {}
    _base_section(w, [entry.title for entry in session.host.list_models()])
    license_section(w, editable=False)
    _generation_section(w, session.host.default_generation())
    _axes_section(w)
    _buttons_section(w)
    _bind(w, actions)
    bind_license_panel(w, session)


def _base_section(w: dict, titles: list[str]) -> None:
    with gr.Accordion("Base merge", open=True):
        with gr.Row():
            for role in ("model_a", "model_b", "model_c"):
                w[role] = gr.Dropdown(choices=titles, value=None, label=f"Model {role[-1].upper()}")
        with gr.Row():
            w["mode"] = gr.Dropdown(choices=list(MODES.values()), value="Weight sum", label="Merge mode")
            w["calcmode"] = gr.Dropdown(choices=list(CALCMODES), value="normal", label="Calculation mode")
            w["alpha"] = gr.Number(value=0.5, label="alpha")
            w["beta"] = gr.Number(value=0.25, label="beta")
        with gr.Row():
            w["weights_alpha"] = gr.Textbox(label="weights alpha (empty: not MBW)", lines=1)
            w["weights_beta"] = gr.Textbox(label="weights beta", lines=1)
        with gr.Row():
            w["dice_mode"] = gr.Dropdown(choices=list(DICE_MODES), value="off", label="Random mode (dice)")
            w["dice_seed"] = gr.Number(value=-1, precision=0, label="dice seed")
            w["base_id"] = gr.Number(value=-1, precision=0, label="history ID")
            w["load_base"] = gr.Button("Load base from history ID", size="sm")
        w[BASE_EXTRA] = gr.Textbox(value="{}", visible=False)


def _generation_section(w: dict, defaults: GenerationParams) -> None:
    with gr.Accordion("txt2img", open=False):
        w["gen.prompt"] = gr.Textbox(value=defaults.prompt, label="Prompt", lines=2)
        w["gen.negative_prompt"] = gr.Textbox(value=defaults.negative_prompt, label="Negative prompt", lines=1)
        with gr.Row():
            w["gen.steps"] = gr.Number(value=defaults.steps, precision=0, label="Steps")
            w["gen.sampler"] = gr.Textbox(value=defaults.sampler, label="Sampler")
            w["gen.cfg_scale"] = gr.Number(value=defaults.cfg_scale, label="CFG scale")
        with gr.Row():
            w["gen.width"] = gr.Number(value=defaults.width, precision=0, label="Width")
            w["gen.height"] = gr.Number(value=defaults.height, precision=0, label="Height")
            w["gen.seed"] = gr.Number(value=defaults.seed, precision=0, label="Seed (-1: one random seed for the plot)")


def _axes_section(w: dict) -> None:
    for axis in "xyz":
        with gr.Row():
            w[f"{axis}_type"] = gr.Dropdown(choices=list(TYPE_NAMES), value="alpha" if axis == "x" else NONE,
                                            label=f"{axis.upper()} type", scale=1)
            w[f"{axis}_values"] = gr.Textbox(label=f"{axis.upper()} values", lines=2, scale=3)
    gr.Markdown(as_message(AXIS_HINT))
    w["options"] = gr.CheckboxGroup(choices=list(OPTION_LABELS), value=[], label="Options")


def _buttons_section(w: dict) -> None:
    with gr.Row():
        w["check"] = gr.Button("Check plan")
        w["run"] = gr.Button("Run XYZ plot", variant="primary")
        w["stop"] = gr.Button("Stop", variant="stop")
    with gr.Row():
        w["random_draws"] = gr.Number(value=10, precision=0, label="Run Rand: number of draws")
        w["run_random"] = gr.Button("Run Rand")
    w[MESSAGE] = gr.Markdown("")
    w[GRIDS] = gr.Gallery(label="Grids")
    with gr.Accordion("Reserved plots", open=False):
        with gr.Row():
            w["reserve"] = gr.Button("Reserve XYZ plot")
            w["run_queue"] = gr.Button("Run reserved plots")
            w["reservation_id"] = gr.Number(value=-1, precision=0, label="reservation ID (-1: all)")
            w["delete"] = gr.Button("Delete reservation")
        w[QUEUE] = gr.Dataframe(headers=list(QUEUE_HEADERS), value=[["", "no reservation", "", "", "", "", ""]],
                                interactive=False)


def _bind(w: dict, actions: XyzActions) -> None:
    bind(w["check"].click, actions.check, w, PLOT_FIELDS, (MESSAGE,))
    bind(w["run"].click, actions.run, w, PLOT_FIELDS, (MESSAGE, GRIDS), progress=True)
    bind(w["run_random"].click, actions.run_random, w, (*PLOT_FIELDS, "random_draws"), (MESSAGE, GRIDS), progress=True)
    bind(w["stop"].click, actions.stop, w, (), (MESSAGE,), queue=False)
    bind(w["reserve"].click, actions.reserve, w, PLOT_FIELDS, (MESSAGE, QUEUE))
    # an input, though unused: a progress event needs one to be called with (bind passes them as one dict)
    bind(w["run_queue"].click, actions.run_queue, w, ("reservation_id",), (MESSAGE, GRIDS, QUEUE), progress=True)
    bind(w["delete"].click, actions.delete_reservation, w, ("reservation_id",), (MESSAGE, QUEUE))
    bind(w["load_base"].click, actions.load_base, w, ("base_id",), (*BASE_FIELDS, BASE_EXTRA, MESSAGE))
