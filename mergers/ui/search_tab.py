"""The Auto-merge tab: search for the block weights whose images score best (:mod:`mergers.search`).

``search_tab(session)`` lays the tab out inside an open ``gr.Tab`` and binds its
events. The handlers are :class:`SearchActions` methods: values by name in,
outputs by name out, errors shown as messages. Start is a generator: the search
runs in a worker thread and each scored candidate reaches the gallery and the
table as it comes; Stop ends the search after the current candidate (the best
so far is still swapped in). Runs on Gradio 3.41 and 4.

Example:
    >>> with gr.Blocks():
    ...     tab_contents(session, feature_tabs=(("Auto-merge", "mergers.ui.search_tab:search_tab"),))
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gradio as gr
from PIL import Image

from mergers.engine import ProgressCallback
from mergers.errors import MergeError, RecipeError
from mergers.host import GenerationParams
from mergers.methods import CALCMODES, MODES
from mergers.search import (
    MAX_BUDGET,
    OPTIMIZERS,
    SIDES,
    Candidate,
    Scorer,
    SearchError,
    SearchResult,
    SearchSpec,
    builtin_scorer,
    run_search,
    search_setup,
)
from mergers.session import MergeSession
from mergers.ui.handlers import MESSAGE, as_message
from mergers.ui.license_panel import bind_license_panel, license_section
from mergers.ui.tab import bind
from mergers.ui.xyz_tab import GENERATION_FIELDS, base_recipe, generation_params
from mergers.weights import format_number, parse_weights

log = logging.getLogger(__name__)

# Component names (the tab's own namespace).
GALLERY, TABLE, BEST, BEST_BOX = "search.gallery", "search.table", "search.best", "search.best_weights"
START, STOP, USE_BEST = "search.start", "search.stop", "search.use_best"
BASE_FIELDS = ("model_a", "model_b", "model_c", "mode", "calcmode", "alpha", "beta", "weights_alpha", "weights_beta")
SEARCH_FIELDS = ("side", "blocks", "lower", "upper", "budget", "seed", "optimizer", "children", "scorer", "reference",
                 "restore")
START_FIELDS = (*BASE_FIELDS, *(f"gen.{name}" for name in GENERATION_FIELDS), *SEARCH_FIELDS)
START_OUTPUTS = (MESSAGE, GALLERY, TABLE, BEST)
TABLE_HEADERS = ("n", "score", "history ID", "weights")  # the long weights last, so the ID stays in sight
EMPTY_TABLE = [["", "", "", ""]]
# Scorer choice → builtin_scorer name.
SCORERS = {"sharpness (crisp detail scores high)": "sharpness", "similarity to a reference image": "similarity"}
GALLERY_MAX = 64  # candidates shown: the best ones, in order (each update sends them all to the browser)
THUMBNAIL = (256, 256)
PROGRESS_EVERY_S = 0.25  # merge progress forwarded to the bar at most this often
NO_GENERATOR = ("**Auto-merge needs an image generator**, and this host has none (the standalone app merges and "
                "saves only). Run supermerger inside the web UI (A1111 or Forge) to search block weights by the "
                "images they make; the search is also at `POST /supermerger/v1/search` there.")
HINT = ("Each candidate merges the base recipe with new weights for the searched blocks (only the keys whose "
        "ratio changed are re-merged), generates with one fixed seed and scores the image. Every candidate is "
        "a merge in the History tab; at the end the best one is swapped in.")


class SearchActions:
    """The tab's handlers around one session: one search at a time, and its Stop."""

    def __init__(self, session: MergeSession):
        self.session = session
        self._stop = threading.Event()  # the running search's own (a new one each Start)
        self._running = threading.Lock()

    # building --------------------------------------------------------------------------------------

    def spec(self, values: Mapping[str, Any]) -> SearchSpec:
        """The search the tab's values describe (checked as far as it can be without model A)."""
        blocks = str(values.get("blocks") or "").strip() or None
        return SearchSpec(
            base_recipe(values), generation_params(values, self.session.host.default_generation()),
            side=values.get("side") or "alpha", blocks=blocks, bounds=(values.get("lower"), values.get("upper")),
            budget=whole_number(values, "budget"), seed=whole_number(values, "seed"),
            optimizer=values.get("optimizer") or "es", children=whole_number(values, "children", default=1),
            restore=bool(values.get("restore")))

    def scorer(self, values: Mapping[str, Any]) -> Scorer:
        choice = values.get("scorer") or next(iter(SCORERS))
        if choice not in SCORERS:
            raise RecipeError(f"unknown scorer {choice!r}; expected one of {', '.join(SCORERS)}")
        reference = values.get("reference")
        if SCORERS[choice] == "similarity" and reference is None:
            raise RecipeError("the similarity scorer needs a reference image: drop one into 'Reference image'")
        return builtin_scorer(SCORERS[choice], reference=reference)

    # events ----------------------------------------------------------------------------------------

    def start(self, values: Mapping[str, Any], *, on_progress: ProgressCallback | None = None) -> Iterator[dict]:
        """Run the search, yielding the outputs after each candidate and the summary at the end."""
        try:
            if not self.session.host.can_generate():
                raise MergeError("Auto-merge needs an image generator; this host has none (run it in the web UI)")
            spec, scorer = self.spec(values), self.scorer(values)
            space, _ = search_setup(spec, self.session.host.resolve)  # a bad block is named before any merge
            spec = dataclasses.replace(spec, layout=space.layout)
        except MergeError as error:
            yield {MESSAGE: as_message(str(error))}
            return
        except Exception as error:  # a bug: keep the tab alive, the traceback goes to the log
            log.exception("Auto-merge: preparing the search failed")
            yield {MESSAGE: as_message(f"unexpected error ({type(error).__name__}): {error}; see the log")}
            return
        if not self._running.acquire(blocking=False):
            yield {MESSAGE: "a search is already running; wait for it or press Stop"}
            return
        self._stop = stop = threading.Event()
        events: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, args=(spec, scorer, stop, events), name="supermerger-search",
                         daemon=True).start()
        shown = Shown(space.layout, space.side, space.blocks, spec.budget)
        yield from self._follow(events, shown, stop, on_progress)

    def stop(self, values: Mapping[str, Any] | None = None) -> dict:
        if not self._running.locked():
            return {MESSAGE: "no search is running"}
        self._stop.set()
        return {MESSAGE: "stopping after the current candidate; the best so far will be swapped in…"}

    def use_best(self, values: Mapping[str, Any]) -> dict:
        """The last search's best weights into the box, to copy into the Merge tab (the summary stays)."""
        best = values.get(BEST) or {}
        if not best.get("weights"):
            return {MESSAGE: "no search result yet: press Start"}
        return {BEST_BOX: best["weights"]}

    # running ---------------------------------------------------------------------------------------

    def _work(self, spec: SearchSpec, scorer: Scorer, stop: threading.Event, events: queue.Queue) -> None:
        """The worker thread: the search, its candidates and progress posted to ``events``, then "done"."""
        result, error = None, None
        try:
            result = run_search(self.session, spec, scorer, stop=stop.is_set,
                                on_candidate=lambda c, score, images: events.put(("candidate", c, _thumbnail(images))),
                                on_progress=_throttled(lambda *progress: events.put(("progress", *progress))))
        except SearchError as failed:
            result, error = failed.result, failed
        except MergeError as failed:
            error = failed
        except Exception as failed:  # a bug: shown in one line, the traceback goes to the log
            log.exception("Auto-merge: the search failed")
            error = MergeError(f"unexpected error ({type(failed).__name__}): {failed}; see the log")
        finally:
            self._running.release()  # before "done", so Start works again as soon as the summary shows
        events.put(("done", result, error))

    def _follow(self, events: queue.Queue, shown: Shown, stop: threading.Event,
                on_progress: ProgressCallback | None) -> Iterator[dict]:
        """The worker's events as outputs; a closed page (the generator dropped) stops the search."""
        finished = False
        try:
            yield {MESSAGE: as_message(f"searching: candidate 1 of {shown.budget}…"), GALLERY: [],
                   TABLE: EMPTY_TABLE, BEST: {}}
            while True:
                kind, *item = events.get()
                if kind == "progress" and on_progress is not None:
                    done, total, _ = item
                    on_progress(done, total, f"candidate {len(shown.candidates) + 1} of {shown.budget}: merging")
                elif kind == "candidate":
                    shown.add(*item)
                    yield shown.outputs(shown.progress_text())
                elif kind == "done":
                    finished = True
                    yield shown.finish(*item)
                    return
        finally:
            if not finished:
                stop.set()


@dataclasses.dataclass
class Shown:
    """What the tab shows of a running search: its candidates (with a thumbnail each) so far."""

    layout: str
    side: str
    blocks: tuple[str, ...]  # the searched ones, in the order of a candidate's values
    budget: int
    candidates: list[tuple[Candidate, Image.Image]] = dataclasses.field(default_factory=list)

    def add(self, candidate: Candidate, thumbnail: Image.Image) -> None:
        self.candidates.append((candidate, thumbnail))

    def gallery(self) -> list[tuple[Image.Image, str]]:
        """The best GALLERY_MAX candidates, in the order they were made, captioned "#n score weights"."""
        best = sorted(self.candidates, key=lambda shown: -shown[0].score)[:GALLERY_MAX]
        return [(image, caption(candidate, self.blocks)) for candidate, image in sorted(best, key=_number)]

    def rows(self) -> list[list[Any]]:
        rows = [[c.number, c.score, c.history_id, readable(c.weights, self.layout)] for c, _ in self.candidates]
        return rows or EMPTY_TABLE

    def progress_text(self) -> str:
        best = max((c for c, _ in self.candidates), key=lambda c: c.score)
        return (f"searching: {len(self.candidates)} of {self.budget} candidates scored, best #{best.number} "
                f"scores {best.score:.4g}…")

    def outputs(self, message: str, best: Candidate | None = None) -> dict:
        outputs = {MESSAGE: as_message(message), GALLERY: self.gallery(), TABLE: self.rows()}
        if best is not None:
            outputs[BEST] = {"side": self.side, "weights": best.weights}
        return outputs

    def finish(self, result: SearchResult | None, error: MergeError | None) -> dict:
        """The summary: the result's, or the error's with the best candidate scored before it."""
        best = result.best if result is not None else None
        if error is None:
            message = result.summary
            if best is not None and result.restored:
                message += f"; best #{best.number} (history ID {best.history_id}): {self.side} " \
                           f"{readable(best.weights, self.layout)}"
            elif best is not None:
                where = f"history ID {result.final_history_id or best.history_id}"
                message += f"; in the model now ({where}): {self.side} {readable(best.weights, self.layout)}"
        else:
            message = str(error) + (f" — best so far #{best.number} scores {best.score:.4g} (not swapped in)"
                                    if best else "")
        if len(self.candidates) > GALLERY_MAX:
            message += f"; the gallery shows the best {GALLERY_MAX}"
        return self.outputs(message, best)


def _number(shown: tuple[Candidate, Image.Image]) -> int:
    return shown[0].number


def caption(candidate: Candidate, blocks: Sequence[str]) -> str:
    """A gallery caption: "#n score weights", the weights of the searched blocks (the others are the base's).

    Example:
        >>> caption(candidate, ("IN04", "M00"))
        '#3 0.912 IN04:0.72 M00:0.25'
    """
    weights = " ".join(f"{block}:{format_number(value)}" for block, value in zip(blocks, candidate.values))
    return f"#{candidate.number} {candidate.score:.4g} {weights}"


def readable(weights: str, layout: str) -> str:
    """A weight string in its short readable form (runs of equal values as one range)."""
    return parse_weights(weights, layout).as_readable()


def whole_number(values: Mapping[str, Any], name: str, *, default: int | None = None) -> int:
    """A Number box's value as an int; anything but a whole number is refused, naming the box."""
    value = values.get(name)
    if value is None or value == "":
        if default is not None:
            return default
        raise RecipeError(f"{name} is empty; give a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a whole number, not {value!r}") from None
    if not number.is_integer():
        raise RecipeError(f"{name} must be a whole number, not {value!r}")
    return int(number)


def _thumbnail(images: Sequence[Image.Image]) -> Image.Image:
    """The first image, small: a long search keeps one per candidate, and re-sends them on each update."""
    image = images[0].copy()
    image.thumbnail(THUMBNAIL)
    return image


def _throttled(report: Callable[[int, int, str], None]) -> ProgressCallback:
    """``report`` at most every PROGRESS_EVERY_S seconds, and at each merge's last key."""
    last = [0.0]

    def on_progress(done: int, total: int, key: str, *rest) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            report(done, total, key)
    return on_progress


# --- layout -----------------------------------------------------------------------------------------


def search_tab(session: MergeSession) -> None:
    """Lay the Auto-merge tab out in the open ``gr.Tab`` and bind its events (or say why it cannot run)."""
    if not session.host.can_generate():
        gr.Markdown(NO_GENERATOR)
        return
    actions = SearchActions(session)
    w: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            _base_section(w, [entry.title for entry in session.host.list_models()])
            license_section(w, editable=False)
            _generation_section(w, session.host.default_generation())
            _search_section(w)
        with gr.Column(scale=2):
            _results_section(w)
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
            w["weights_alpha"] = gr.Textbox(label="weights alpha (blocks not searched keep these; empty: alpha)",
                                            lines=1)
            w["weights_beta"] = gr.Textbox(label="weights beta (empty: beta)", lines=1)


def _generation_section(w: dict, defaults: GenerationParams) -> None:
    with gr.Accordion("txt2img (one seed for every candidate)", open=False):
        w["gen.prompt"] = gr.Textbox(value=defaults.prompt, label="Prompt", lines=2)
        w["gen.negative_prompt"] = gr.Textbox(value=defaults.negative_prompt, label="Negative prompt", lines=1)
        with gr.Row():
            w["gen.steps"] = gr.Number(value=defaults.steps, precision=0, label="Steps")
            w["gen.sampler"] = gr.Textbox(value=defaults.sampler, label="Sampler")
            w["gen.cfg_scale"] = gr.Number(value=defaults.cfg_scale, label="CFG scale")
        with gr.Row():
            w["gen.width"] = gr.Number(value=defaults.width, precision=0, label="Width")
            w["gen.height"] = gr.Number(value=defaults.height, precision=0, label="Height")
            w["gen.seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: the search's seed)")


def _search_section(w: dict) -> None:
    with gr.Accordion("Search", open=True):
        with gr.Row():
            w["side"] = gr.Radio(choices=list(SIDES), value="alpha", label="Search the weights of")
            w["blocks"] = gr.Textbox(label="Blocks to search (e.g. IN04 M00 OUT05; empty: all)", lines=1)
        with gr.Row():
            w["lower"] = gr.Number(value=0.0, label="Lower bound")
            w["upper"] = gr.Number(value=1.0, label="Upper bound")
            w["budget"] = gr.Number(value=20, precision=0, label=f"Budget (candidates, 1–{MAX_BUDGET})")
            w["seed"] = gr.Number(value=1, precision=0, label="Search seed")
        with gr.Row():
            w["optimizer"] = gr.Dropdown(choices=list(OPTIMIZERS), value="es",
                                         label="Optimizer (es: evolution strategy; coordinate: one block at a time)")
            w["children"] = gr.Number(value=1, precision=0, label="es: children per generation")
        w["scorer"] = gr.Radio(choices=list(SCORERS), value=next(iter(SCORERS)), label="Score by")
        w["reference"] = gr.Image(type="pil", label="Reference image (for similarity)")
        w["restore"] = gr.Checkbox(value=False, label="restore the model at the end (instead of swapping in the best)")
        gr.Markdown(as_message(HINT))


def _results_section(w: dict) -> None:
    with gr.Row():
        w[START] = gr.Button("Start", variant="primary")
        w[STOP] = gr.Button("Stop", variant="stop")
    w[MESSAGE] = gr.Markdown("")
    w[GALLERY] = gr.Gallery(label="Candidates (#n score weights)")
    w[TABLE] = gr.Dataframe(headers=list(TABLE_HEADERS), value=EMPTY_TABLE, interactive=False)
    w[USE_BEST] = gr.Button("Use best weights")
    w[BEST_BOX] = gr.Textbox(label="Best weights (paste them into the Merge tab's weights box of that side)",
                             lines=2)
    w[BEST] = gr.State({})


def _bind(w: dict, actions: SearchActions) -> None:
    bind_stream(w[START].click, actions.start, w, START_FIELDS, START_OUTPUTS)
    bind(w[STOP].click, actions.stop, w, (), (MESSAGE,), queue=False)
    bind(w[USE_BEST].click, actions.use_best, w, (BEST,), (BEST_BOX, MESSAGE))


def bind_stream(event: Callable, handler: Callable[..., Iterator[dict]], w: dict, inputs: Sequence[str],
                outputs: Sequence[str]) -> None:
    """:func:`mergers.ui.tab.bind` for a generator handler: each dict it yields updates its outputs as it
    comes, and its ``on_progress`` drives Gradio's bar."""
    names = {w[name]: name for name in inputs}

    def run(data, progress=gr.Progress()):  # noqa: B008 - Gradio finds its progress bar by this default
        def on_progress(done: int, total: int, text: str) -> None:
            progress((done, total), desc=text)
        for result in handler({names[component]: value for component, value in data.items()},
                              on_progress=on_progress):
            yield {w[name]: value for name, value in result.items() if name in outputs}

    event(run, inputs=set(names), outputs=[w[name] for name in outputs], queue=True, api_name=False)
