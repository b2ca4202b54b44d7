"""The XYZ tab: it builds under Gradio 4 and 3.41, and its handlers turn values into plots and messages."""

import os
from pathlib import Path

import gradio as gr
import pytest

from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.ui.handlers import MESSAGE
from mergers.ui.tab import tab_contents
from mergers.ui.xyz_tab import BASE_EXTRA, GRIDS, QUEUE, XyzActions, base_recipe, base_values
from tests.gradio3 import run_under_gradio3
from tests.ui_host import UiHost

ROOT = Path(__file__).resolve().parents[1]
GRADIO3_PYTHON = Path(os.environ.get("SUPERMERGER_GRADIO3_PYTHON") or ROOT / ".venv-g3" / "bin" / "python")
FEATURE = (("XYZ plot", "mergers.ui.xyz_tab:xyz_tab"),)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def actions(tmp_path):
    return XyzActions(MergeSession(UiHost.create(tmp_path)), folder=tmp_path / "grids")


def _values(**changes):
    values = {"model_a": "a.safetensors", "model_b": "b.safetensors", "model_c": None, "mode": "Weight sum",
              "calcmode": "normal", "alpha": 0.5, "beta": 0.25, "weights_alpha": "", "weights_beta": "",
              "dice_mode": "off", "dice_seed": -1, BASE_EXTRA: "{}", "gen.prompt": "a cat", "gen.seed": 3,
              "x_type": "alpha", "x_values": "0.2, 0.8", "y_type": "seed", "y_values": "1, 2", "z_type": "none",
              "z_values": "", "options": []}
    return {**values, **changes}


def test_the_tab_builds_in_gradio_4(tmp_path):
    session = MergeSession(UiHost.create(tmp_path))
    with gr.Blocks():
        tab_contents(session, feature_tabs=FEATURE)


def test_the_tab_builds_in_gradio_3_41(tmp_path):
    UiHost.create(tmp_path)
    out = run_under_gradio3(GRADIO3_BUILD, tmp_path / "models", tmp_path / "data", folder=tmp_path)
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
    session = MergeSession(UiHost(Path(sys.argv[1]), Path(sys.argv[2])))
    with gr.Blocks():
        tab_contents(session, feature_tabs=(("XYZ plot", "mergers.ui.xyz_tab:xyz_tab"),))
unknown = [str(w.message) for w in caught if "kwarg" in str(w.message)]
assert not unknown, unknown
print("gradio", gr.__version__, "ok")
'''


def test_check_counts_cells_and_merges(actions):
    assert actions.check(_values())[MESSAGE] == "4 cells, 2 merges (1 re-merge only the keys whose ratio changed)"


def test_errors_are_messages_naming_the_axis(actions):
    message = actions.check(_values(y_values="1, two"))[MESSAGE]
    assert "Y axis (seed), value 2 'two'" in message and GRIDS not in actions.check(_values(y_values="x"))
    assert "Model A and Model B" in actions.check(_values(model_a=None))[MESSAGE]


def test_run_shows_the_grid_reports_progress_per_cell_and_saves_it(actions, tmp_path):
    progress = []
    out = actions.run(_values(options=["save CSV"]), on_progress=lambda done, total, text: progress.append((done, total)))
    assert len(out[GRIDS]) == 1 and "4 of 4 cells, 2 merges" in out[MESSAGE]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert sorted(p.suffix for p in (tmp_path / "grids").iterdir()) == [".csv", ".png"]


def test_stop_during_a_run_still_shows_the_partial_grid(actions):
    def stop_at_first(done, total, text):
        actions.stop()

    out = actions.run(_values(), on_progress=stop_at_first)
    assert "1 of 4 cells" in out[MESSAGE] and "stopped" in out[MESSAGE] and len(out[GRIDS]) == 1


def test_run_rand_needs_a_random_mode_and_draws_each_cell(actions):
    assert "Random Mode" in actions.run_random({**_values(), "random_draws": 3})[MESSAGE]
    out = actions.run_random({**_values(dice_mode="R"), "random_draws": 3})
    assert "3 of 3 cells, 3 merges" in out[MESSAGE]
    entries = actions.session.history.entries(newest_first=False)
    assert len({entry.recipe.weights_alpha for entry in entries}) == 3  # each draw's weights are recorded


def test_reserve_run_and_delete_reservations(actions):
    assert actions.reserve(_values())[QUEUE][0][:2] == [1, "waiting"]
    actions.reserve(_values(x_values="0.4"))
    out = actions.run_queue({})
    assert out[MESSAGE] == "plot 1: finished; plot 2: finished" and len(out[GRIDS]) == 2
    actions.delete_reservation({"reservation_id": -1})
    assert actions.queue_rows()[0][1] == "no reservation"


def test_load_base_from_history_round_trips_the_recipe(actions):
    recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors", weights_alpha="GRAD_V", elemental="IN01::0",
                    adjust="1,0,0")
    actions.session.merge(recipe)
    shown = actions.load_base({"base_id": -1})
    assert "ID 1" in shown[MESSAGE]
    assert base_recipe(_values(**{k: v for k, v in shown.items() if k != MESSAGE})) == actions.session.current.recipe
    assert base_recipe(base_values(recipe)) == recipe
