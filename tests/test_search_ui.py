"""The Auto-merge tab (mergers/ui/search_tab.py): it builds under Gradio 4 and 3.41 (and says why it cannot
run without a generator), and its Start handler streams scored candidates to the gallery and the table."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from mergers.recipe import Recipe
from mergers.search import scores_by_history_id
from mergers.session import MergeSession
from mergers.ui.handlers import MESSAGE
from mergers.ui.search_tab import (
    BEST,
    BEST_BOX,
    GALLERY,
    NO_GENERATOR,
    SCORERS,
    TABLE,
    SearchActions,
    whole_number,
)
from mergers.ui.tab import FEATURE_TABS, tab_contents
from tests.gradio3 import run_under_gradio3
from tests.test_ui import plain
from tests.ui_host import UiHost, write_models

FEATURE = (("Auto-merge", "mergers.ui.search_tab:search_tab"),)
MODELS = {"a.safetensors": ("sd1", 1), "b.safetensors": ("sd1", 2)}
SIMILARITY = next(label for label, name in SCORERS.items() if name == "similarity")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search_ui") / "models"
    write_models(folder, MODELS)  # SD1 only: the test host hashes every file it lists, on each lookup
    return folder


@pytest.fixture
def actions(models, tmp_path) -> SearchActions:
    return SearchActions(MergeSession(UiHost(models, tmp_path / "data")))


def _values(**changes) -> dict:
    values = {"model_a": "a.safetensors", "model_b": "b.safetensors", "model_c": None, "mode": "Weight sum",
              "calcmode": "normal", "alpha": 0.5, "beta": 0.25, "weights_alpha": "", "weights_beta": "",
              "gen.prompt": "a cat", "gen.seed": -1, "side": "alpha", "blocks": "IN04 M00 OUT05", "lower": 0.0,
              "upper": 1.0, "budget": 3, "seed": 1, "optimizer": "es", "children": 1, "scorer": SIMILARITY,
              "reference": Image.new("RGB", (16, 16), (200, 40, 90))}
    return {**values, **changes}


def _run(actions: SearchActions, values: dict, **options) -> list[dict]:
    return list(actions.start(values, **options))


# --- the build --------------------------------------------------------------------------------------


def test_the_tab_is_a_feature_tab_and_builds_in_gradio_4(models, tmp_path):
    assert FEATURE[0] in FEATURE_TABS
    with gr.Blocks() as blocks:
        tab_contents(MergeSession(UiHost(models, tmp_path / "data")), feature_tabs=FEATURE)
    labels = {getattr(block, "label", None) for block in blocks.blocks.values()}
    assert {"Reference image (for similarity)", "Candidates (#n score weights)", "Score by"} <= labels


def test_without_a_generator_the_tab_says_so_instead_of_offering_start(models, tmp_path):
    with gr.Blocks() as blocks:
        tab_contents(MergeSession(UiHost(models, tmp_path / "data", live_from=None)), feature_tabs=FEATURE)
    texts = [getattr(block, "value", None) for block in blocks.blocks.values() if isinstance(block, gr.Markdown)]
    assert NO_GENERATOR in texts
    assert not any(isinstance(block, gr.Button) and block.value == "Start" for block in blocks.blocks.values())


def test_the_tab_builds_in_gradio_3_41(models, tmp_path):
    out = run_under_gradio3(GRADIO3_BUILD, models, tmp_path / "data", folder=tmp_path)
    assert out.startswith("gradio 3.41.2 ok")


GRADIO3_BUILD = '''
import sys, warnings
from pathlib import Path
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradio as gr
    from tests.ui_host import UiHost
    from mergers.session import MergeSession
    from mergers.ui.tab import tab_contents
    from mergers.ui.search_tab import NO_GENERATOR
    for live in ("a.safetensors", None):
        with gr.Blocks() as blocks:
            session = MergeSession(UiHost(Path(sys.argv[1]), Path(sys.argv[2]), live_from=live))
            tab_contents(session, feature_tabs=(("Auto-merge", "mergers.ui.search_tab:search_tab"),))
        shown = [getattr(b, "value", None) for b in blocks.blocks.values() if isinstance(b, gr.Markdown)]
        assert (NO_GENERATOR in shown) == (live is None), shown
unknown = [str(w.message) for w in caught if "kwarg" in str(w.message)]
assert not unknown, unknown
print("gradio", gr.__version__, "ok")
'''


# --- Start, Stop, Use best weights ------------------------------------------------------------------


def test_start_streams_three_candidates_then_the_summary_and_the_best_weights(actions):
    progress = []
    outputs = _run(actions, _values(), on_progress=lambda done, total, text: progress.append(text))

    assert outputs[0][MESSAGE] == "searching: candidate 1 of 3…" and outputs[0][GALLERY] == []
    assert [len(out[GALLERY]) for out in outputs[1:]] == [1, 2, 3, 3]  # one update per candidate, then the end
    final = outputs[-1]
    entries = actions.session.history.entries(newest_first=False)
    rows = final[TABLE]
    assert [row[0] for row in rows] == [1, 2, 3] and [row[2] for row in rows] == [e.id for e in entries[:3]]
    scores = scores_by_history_id(actions.session.history.folder)
    assert [row[1] for row in rows] == [scores[e.id] for e in entries[:3]]
    assert rows[0][3] == "ALL:0.5" and "IN04:" in rows[1][3]  # the base (every block at alpha), then a move
    captions = [text for _, text in final[GALLERY]]
    assert captions[0] == f"#1 {rows[0][1]:.4g} IN04:0.5 M00:0.5 OUT05:0.5"
    assert all(text.startswith(f"#{n} ") and "IN04:" in text for n, text in enumerate(captions, 1))
    best = max(rows, key=lambda row: row[1])
    assert "3 of 3 candidates" in plain(final[MESSAGE]) and f"best #{best[0]}" in plain(final[MESSAGE])
    assert progress and all(text.startswith("candidate ") for text in progress)
    # The best is in the model, and "Use best weights" puts its weight string in the box.
    current = actions.session.current.recipe
    assert final[BEST] == {"side": "alpha", "weights": current.weights_alpha}
    assert actions.use_best({BEST: final[BEST]})[BEST_BOX] == current.weights_alpha
    assert "no search result" in actions.use_best({BEST: {}})[MESSAGE]


def test_every_candidate_is_a_history_entry_naming_the_run(actions):
    _run(actions, _values())
    entries = actions.session.history.entries(newest_first=False)
    runs = {entry.extra["search"]["run"] for entry in entries}
    assert len(runs) == 1 and [e.extra["search"].get("candidate") for e in entries[:3]] == [1, 2, 3]
    if len(entries) == 4:  # the best merged again at the end, unless it was the last candidate
        assert set(entries[3].extra["search"]) == {"run", "best"}
    assert all(isinstance(entry.recipe, Recipe) for entry in entries)


def test_stop_ends_the_search_after_the_current_candidate(actions, monkeypatch):
    real_scorer = actions.scorer

    def stopping_scorer(values):
        score, calls = real_scorer(values), []

        def scorer(images, params):
            calls.append(1)
            if len(calls) == 2:  # the user presses Stop while candidate 2 is scored
                assert "stopping" in actions.stop()[MESSAGE]
            return score(images, params)
        return scorer

    monkeypatch.setattr(actions, "scorer", stopping_scorer)
    final = _run(actions, _values(budget=5))[-1]
    assert len(final[TABLE]) == 2 and "stopped" in plain(final[MESSAGE])
    assert actions.stop()[MESSAGE] == "no search is running"


def test_a_closed_page_stops_the_search(actions):
    outputs = actions.start(_values(budget=20))
    next(outputs), next(outputs)  # the start and candidate 1
    outputs.close()
    deadline = time.monotonic() + 20
    while actions._running.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not actions._running.locked()
    assert len(actions.session.history.entries()) < 20


@pytest.mark.parametrize(("changes", "message"), [
    ({"blocks": "IN04 IN12"}, "IN12: search blocks must be ids of the sd1 layout"),
    ({"reference": None}, "needs a reference image"),
    ({"budget": 2.5}, "budget must be a whole number, not 2.5"),
    ({"budget": 0}, "budget must be a whole number of candidates from 1"),
    ({"side": "beta"}, "does not use beta"),
    ({"model_b": None}, "choose Model A and Model B"),
    ({"lower": 1.0, "upper": 0.0}, "lower < upper"),
])
def test_a_bad_setting_is_a_message_before_any_merge(actions, changes, message):
    outputs = _run(actions, _values(**changes))
    assert len(outputs) == 1 and message in plain(outputs[0][MESSAGE])
    assert actions.session.history.entries() == []


def test_a_second_start_while_one_runs_is_refused(actions):
    with actions._running:
        outputs = _run(actions, _values())
    assert outputs == [{MESSAGE: "a search is already running; wait for it or press Stop"}]


def test_whole_number_names_the_box():
    assert whole_number({"budget": 4.0}, "budget") == 4 and whole_number({}, "children", default=1) == 1
    with pytest.raises(Exception, match="seed is empty"):
        whole_number({"seed": None}, "seed")


def test_start_is_wired_as_a_streaming_event_of_the_tab(models, tmp_path):
    """The Start button's Gradio function (bind_stream): a generator of component updates, as Gradio calls it."""
    with gr.Blocks() as blocks:
        tab_contents(MergeSession(UiHost(models, tmp_path / "data")), feature_tabs=FEATURE)
    start = next(fn for fn in _functions(blocks) if inspect.isgeneratorfunction(fn.fn))
    given = {"Model A": "a.safetensors", "Model B": "b.safetensors", "Budget (candidates, 1–1000)": 2,
             "Blocks to search (e.g. IN04 M00 OUT05; empty: all)": "M00"}
    data = {component: given.get(component.label, component.value) for component in start.inputs}
    updates = list(start.fn(data, progress=lambda *args, **kwargs: None))
    final = updates[-1]
    gallery = next(value for component, value in final.items() if isinstance(component, gr.Gallery))
    table = next(value for component, value in final.items() if isinstance(component, gr.Dataframe))
    assert len(updates) == 4 and len(gallery) == 2 and [row[0] for row in table] == [1, 2]
    assert [caption[:3] for _, caption in gallery] == ["#1 ", "#2 "] and "M00:" in gallery[1][1]


def _functions(blocks: gr.Blocks) -> list:
    return list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
