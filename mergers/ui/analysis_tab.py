"""The Analysis tab: how alike two models are, block by block, as a chart, tables and CSV; a file's
metadata and recipe; its elements (key, block, shape, dtype) with a search.

``analysis_tab(session)`` lays the tab out in the open ``gr.Tab`` and binds its events; the work
is done by :class:`AnalysisActions`, plain functions of values by name → outputs by name (see
:mod:`mergers.ui.handlers`), which the tests call directly. Runs on Gradio 3.41 and 4.

Example:
    >>> tab_contents(session, feature_tabs=(("Analysis", "mergers.ui.analysis_tab:analysis_tab"),))
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from mergers.analysis import (
    CHARTS,
    ELEMENT_HEADERS,
    Comparison,
    compare_merge,
    compare_models,
    csv_text,
    element_rows,
    metadata_view,
    recipe_lines,
    render_chart,
)
from mergers.analysis.compare import FIT_STATISTICS, GROUP_STATISTICS
from mergers.arch import detect_architecture
from mergers.checkpoint import open_checkpoint
from mergers.engine import ProgressCallback
from mergers.errors import MergeError
from mergers.session import MergeSession
from mergers.ui.handlers import MESSAGE, as_message, shows_errors
from mergers.ui.tab import bind

# Component names (the tab's own namespace: this dict is not the Merge tab's).
MODEL_A, MODEL_B, MERGED, REFRESH = "model_a", "model_b", "merged", "refresh"
STATISTIC, CHART, COMPARE, STOP, RESULT = "statistic", "chart", "compare", "stop", "result"
IMAGE, COMPONENTS, KEYS, SEARCH, SORT, DESCENDING, FILES = (
    "image", "components", "keys", "search", "sort", "descending", "files")
META_MODEL, META_JSON, META_RECIPE = "meta_model", "meta_json", "meta_recipe"
ELEMENTS_MODEL, ELEMENTS_SEARCH, ELEMENTS = "elements_model", "elements_search", "elements"

STATISTICS = GROUP_STATISTICS + FIT_STATISTICS
GROUP_HEADERS = ("name", "keys") + STATISTICS
KEY_HEADERS = ("name", "block", "component", "shape", "cosine", "relative_l2", "norm_a", "norm_b") + FIT_STATISTICS
SORT_CHOICES = ("file order",) + KEY_HEADERS
SHOWN_DECIMALS = 6
UNSAFE_FILE_CHARS = re.compile(r"[^\w.+=\-]")
# CSV downloads go to one folder of the temp dir (Gradio serves files from there), named by the models
# compared, so repeated comparisons replace their files instead of piling up.
EXPORT_DIR = Path(tempfile.gettempdir()) / "supermerger-analysis"


class AnalysisActions:
    """The tab's handlers around one :class:`MergeSession`'s host."""

    def __init__(self, session: MergeSession):
        self.host = session.host
        self._cancel = threading.Event()

    def model_titles(self) -> list[str]:
        return [entry.title for entry in self.host.list_models()]

    @shows_errors
    def refresh(self, values: Mapping[str, Any]) -> dict:
        """Reload the checkpoint list into every model dropdown."""
        titles = self.model_titles()
        return {name: gr.update(choices=titles) for name in (MODEL_A, MODEL_B, MERGED, META_MODEL, ELEMENTS_MODEL)}

    @shows_errors
    def compare(self, values: Mapping[str, Any], *, on_progress: ProgressCallback | None = None) -> dict:
        """Compare A and B (and the merge, if one is chosen): chart, tables, CSV files and a summary."""
        paths = [self._path(values.get(name), label) for name, label in ((MODEL_A, "model A"), (MODEL_B, "model B"))]
        merged = self._path(values[MERGED], "the merge") if values.get(MERGED) else None
        self._cancel.clear()
        if merged is not None:
            result = compare_merge(*paths, merged, on_progress=on_progress, cancel=self._cancel)
        else:
            result = compare_models(*paths, on_progress=on_progress, cancel=self._cancel)
        statistic = _statistic(values.get(STATISTIC), result)
        return {RESULT: result, IMAGE: render_chart(result, statistic, values.get(CHART) or "bars"),
                COMPONENTS: group_table(result.components), KEYS: key_table(result, "", "file order", False),
                FILES: export_csv(result), MESSAGE: as_message(summary(result))}

    @shows_errors
    def stop(self, values: Mapping[str, Any] | None = None) -> dict:
        """Ask the running comparison to stop."""
        self._cancel.set()
        return {MESSAGE: as_message("stopping the comparison")}

    @shows_errors
    def redraw(self, values: Mapping[str, Any]) -> dict:
        """The chart again, for another statistic or chart kind (no file is read)."""
        result = values.get(RESULT)
        if not isinstance(result, Comparison):
            return {}
        return {IMAGE: render_chart(result, _statistic(values.get(STATISTIC), result), values.get(CHART) or "bars")}

    @shows_errors
    def filter_keys(self, values: Mapping[str, Any]) -> dict:
        """The per-key table searched and sorted as asked."""
        result = values.get(RESULT)
        if not isinstance(result, Comparison):
            return {}
        return {KEYS: key_table(result, values.get(SEARCH) or "", values.get(SORT) or "file order",
                                bool(values.get(DESCENDING)))}

    @shows_errors
    def show_metadata(self, values: Mapping[str, Any]) -> dict:
        """A file's safetensors metadata (JSON values decoded) and its merge recipe, readable."""
        with open_checkpoint(self._path(values.get(META_MODEL), "a model")) as ckpt:
            layout = _layout(ckpt)
            lines = recipe_lines(ckpt.metadata, layout)
            view = metadata_view(ckpt.metadata)
        recipe = "\n".join(f"- {as_message(line)}" for line in lines) or "no merge recipe in this file"
        return {META_JSON: view, META_RECIPE: recipe, MESSAGE: ""}

    @shows_errors
    def show_elements(self, values: Mapping[str, Any]) -> dict:
        """A file's keys with block, component, shape and dtype; only those holding every search word."""
        with open_checkpoint(self._path(values.get(ELEMENTS_MODEL), "a model")) as ckpt:
            rows = element_rows(ckpt, values.get(ELEMENTS_SEARCH) or "")
        return {ELEMENTS: rows or [[""] * len(ELEMENT_HEADERS)], MESSAGE: as_message(f"{len(rows)} elements")}

    def _path(self, title: Any, label: str) -> Path:
        if not title:
            raise MergeError(f"choose {label} first")
        return self.host.resolve(str(title))


def summary(result: Comparison) -> str:
    """One line on what was compared, how many keys, how long; and how many keys were left out."""
    merged = f", merge {result.model_merged}" if result.model_merged else ""
    text = (f"{result.architecture}: {result.model_a} vs {result.model_b}{merged}: "
            f"{len(result.keys)} keys compared in {result.seconds:.1f} s")
    return text + (f"; {len(result.skipped)} keys left out (EMA, buffers, other shapes)" if result.skipped else "")


def group_table(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Block or component rows as table rows (``GROUP_HEADERS``)."""
    return [[_shown(row.get(column)) for column in GROUP_HEADERS] for row in rows]


def key_table(result: Comparison, search: str, sort: str, descending: bool) -> list[list[Any]]:
    """The key rows holding every word of ``search``, sorted by ``sort`` (a column, or file order).

    Example:
        >>> key_table(result, "attn2", "cosine", False)[0][0]
        'model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight'
    """
    words = search.lower().split()
    rows = [row for row in result.keys if all(word in row["name"].lower() for word in words)]
    if sort in KEY_HEADERS:
        present = [row for row in rows if row.get(sort) is not None]
        missing = [row for row in rows if row.get(sort) is None]  # keys without the value go last
        rows = sorted(present, key=lambda row: _sort_key(row[sort]), reverse=descending) + missing
    table = [[_shown(row.get(column)) for column in KEY_HEADERS] for row in rows]
    return table or [[""] * len(KEY_HEADERS)]  # an empty table loses its columns in Gradio 3


def export_csv(result: Comparison) -> list[str]:
    """The block and key rows as two CSV files in :data:`EXPORT_DIR`; their paths."""
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    names = [result.model_a, result.model_b] + ([result.model_merged] if result.model_merged else [])
    stem = UNSAFE_FILE_CHARS.sub("_", "_vs_".join(Path(name).stem for name in names))[:150]
    paths = []
    for part, rows in (("blocks", result.blocks), ("keys", result.keys)):
        path = EXPORT_DIR / f"{stem}_{part}.csv"
        path.write_text(csv_text(rows), encoding="utf-8", newline="")
        paths.append(str(path))
    return paths


def _statistic(name: Any, result: Comparison) -> str:
    if name in result.statistics:
        return name
    if name in FIT_STATISTICS:
        raise MergeError(f"{name} needs a merge: choose the merged model too")
    return "cosine"


def _layout(ckpt) -> str | None:
    try:
        return detect_architecture(ckpt.shapes, ckpt.metadata, source=ckpt.name).layout
    except MergeError:
        return None


def _shown(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return round(value, SHOWN_DECIMALS)
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return value


def _sort_key(value: Any) -> Any:
    return value if not isinstance(value, list) else [int(v) for v in value]


# --- layout and events ------------------------------------------------------------------------


def analysis_tab(session: MergeSession) -> None:
    """Lay the Analysis tab out in the open ``gr.Tab`` and bind its events.

    Example:
        >>> with gr.Blocks(), gr.Tab("Analysis"):
        ...     analysis_tab(session)
    """
    actions = AnalysisActions(session)
    w: dict[str, Any] = {RESULT: gr.State(None)}
    titles = actions.model_titles()
    _models_section(w, titles)
    _chart_section(w)
    _keys_section(w)
    with gr.Accordion("Metadata", open=False):
        _metadata_section(w, titles)
    with gr.Accordion("Elements", open=False):
        _elements_section(w, titles)
    _bind(w, actions)


def _models_section(w: dict, titles: list[str]) -> None:
    with gr.Row():
        w[MODEL_A] = gr.Dropdown(choices=titles, value=None, label="Model A")
        w[MODEL_B] = gr.Dropdown(choices=titles, value=None, label="Model B")
        w[MERGED] = gr.Dropdown(choices=titles, value=None, label="Merge of A and B (optional: how much of B is in it)")
        w[REFRESH] = gr.Button("Refresh", size="sm", scale=0, min_width=80)
    with gr.Row():
        w[STATISTIC] = gr.Radio(choices=list(STATISTICS), value="cosine", label="Chart shows")
        w[CHART] = gr.Radio(choices=list(CHARTS), value="bars", label="Chart")
        w[COMPARE] = gr.Button("Compare", variant="primary")
        w[STOP] = gr.Button("Stop", variant="stop")
    w[MESSAGE] = gr.Markdown("")


def _chart_section(w: dict) -> None:
    w[IMAGE] = gr.Image(label="Blocks", type="pil", interactive=False)
    w[COMPONENTS] = gr.Dataframe(headers=list(GROUP_HEADERS), label="Text encoder, U-Net, VAE", interactive=False)
    w[FILES] = gr.File(label="CSV (blocks, keys)", file_count="multiple", interactive=False)


def _keys_section(w: dict) -> None:
    with gr.Accordion("Keys", open=False):
        with gr.Row():
            w[SEARCH] = gr.Textbox(label="Search keys (every word)", placeholder="attn2 out.0")
            w[SORT] = gr.Dropdown(choices=list(SORT_CHOICES), value="file order", label="Sort by")
            w[DESCENDING] = gr.Checkbox(label="Descending", value=False)
        w[KEYS] = gr.Dataframe(headers=list(KEY_HEADERS), label="Per key", interactive=False)


def _metadata_section(w: dict, titles: list[str]) -> None:
    w[META_MODEL] = gr.Dropdown(choices=titles, value=None, label="Model")
    w[META_RECIPE] = gr.Markdown("")
    w[META_JSON] = gr.JSON(label="safetensors metadata")


def _elements_section(w: dict, titles: list[str]) -> None:
    with gr.Row():
        w[ELEMENTS_MODEL] = gr.Dropdown(choices=titles, value=None, label="Model")
        w[ELEMENTS_SEARCH] = gr.Textbox(label="Search keys (every word)", placeholder="attn2 weight")
    w[ELEMENTS] = gr.Dataframe(headers=list(ELEMENT_HEADERS), label="Elements", interactive=False)


def _bind(w: dict, actions: AnalysisActions) -> None:
    outputs = (RESULT, IMAGE, COMPONENTS, KEYS, FILES, MESSAGE)
    bind(w[COMPARE].click, actions.compare, w, (MODEL_A, MODEL_B, MERGED, STATISTIC, CHART), outputs, progress=True)
    bind(w[STOP].click, actions.stop, w, (), (MESSAGE,), queue=False)
    bind(w[REFRESH].click, actions.refresh, w, (), (MODEL_A, MODEL_B, MERGED, META_MODEL, ELEMENTS_MODEL, MESSAGE))
    for name in (STATISTIC, CHART):
        bind(w[name].change, actions.redraw, w, (RESULT, STATISTIC, CHART), (IMAGE, MESSAGE))
    for event in (w[SEARCH].submit, w[SORT].change, w[DESCENDING].change):
        bind(event, actions.filter_keys, w, (RESULT, SEARCH, SORT, DESCENDING), (KEYS, MESSAGE))
    bind(w[META_MODEL].change, actions.show_metadata, w, (META_MODEL,), (META_JSON, META_RECIPE, MESSAGE))
    for event in (w[ELEMENTS_MODEL].change, w[ELEMENTS_SEARCH].submit):
        bind(event, actions.show_elements, w, (ELEMENTS_MODEL, ELEMENTS_SEARCH), (ELEMENTS, MESSAGE))
