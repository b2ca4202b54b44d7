"""The tab without a browser: the field declaration, the Recipe round trip, the build, the handlers."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import fields
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from mergers.dice import Dice
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.ui.fields import (
    FIELD_NAMES,
    FIELDS,
    UI_ONLY,
    default_values,
    dice_fields_in_tab,
    recipe_fields_in_tab,
    recipe_from_ui,
    ui_from_recipe,
)
from mergers.ui.handlers import HIDDEN_FOR_SDXL, SLIDER_NAMES, TabActions, slider_name
from tests.gradio3 import run_under_gradio3
from tests.ui_host import UiHost, weights_checksum

ROOT = Path(__file__).resolve().parents[1]
# The Gradio 3.41.2 venv `make test` builds (A1111 1.10's pins); another one can be named in the environment.
GRADIO3_PYTHON = Path(os.environ.get("SUPERMERGER_GRADIO3_PYTHON")
                      or Path(__file__).resolve().parents[1] / ".venv-g3" / "bin" / "python")
# Recipe fields the tab deliberately does not edit. A new Recipe field must be declared in
# mergers/ui/fields.py, or listed here with the reason it stays off the tab.
# more_models: models past C come from recipe files and the API; the tab chains by hand
# ("Use the current merge as model A").
NOT_IN_TAB: frozenset[str] = frozenset({"more_models", "key_fingerprint"})  # the plan records the fingerprint


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """The tiny checkpoints, written once for the module."""
    root = tmp_path_factory.mktemp("ui")
    UiHost.create(root)
    return root


@pytest.fixture
def host(models_root, tmp_path) -> UiHost:
    """A fresh host (its own live model and history) over the shared models."""
    return UiHost(models_root / "models", tmp_path / "data")


@pytest.fixture
def actions(host) -> TabActions:
    return TabActions(MergeSession(host))


def values_for(actions: TabActions, **changes) -> dict:
    """The tab's default values with models A and B (a, b) chosen and ``changes`` applied."""
    titles = {Path(t.split(" [")[0]).stem: t for t in actions.model_titles()}
    return {**default_values(), "model_a": titles["a"], "model_b": titles["b"],
            **{k: titles.get(v, v) if k.startswith("model_") else v for k, v in changes.items()}}


def plain(message: str) -> str:
    """A message without its Markdown escapes."""
    return re.sub(r"\\(.)", r"\1", message)


def value_of(output):
    """A handler output's value, whether plain or a ``gr.update(value=…)``."""
    return output["value"] if isinstance(output, dict) and "__type__" in output else output


# --- the declaration ------------------------------------------------------------------------


def test_fields_cover_exactly_the_recipe_fields():
    recipe_fields = {f.name for f in fields(Recipe)}
    assert recipe_fields_in_tab() == recipe_fields - NOT_IN_TAB
    assert dice_fields_in_tab() == {f.name for f in fields(Dice)}
    assert len(set(FIELD_NAMES)) == len(FIELD_NAMES)
    assert {f.name for f in FIELDS if f.recipe_field is None} == set(UI_ONLY)


def test_labels_are_the_originals():
    labels = {f.name: f.label for f in FIELDS}
    assert labels["model_a"] == "Model A" and labels["model_b"] == "Model B" and labels["model_c"] == "Model C"
    assert labels["mode"] == "Merge Mode" and labels["calcmode"] == "Calculation Mode"
    assert (labels["alpha"], labels["beta"], labels["adjust"]) == ("alpha", "beta", "Adjust")
    assert labels["elemental"] == "Elemental Merge"
    assert next(f for f in FIELDS if f.name == "mode").widget.options["choices"][:4] == [
        "Weight sum", "Add difference", "Triple sum", "sum Twice"]


RECIPES = [
    Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3),
    Recipe(model_a="a.safetensors", model_b="b.safetensors", model_c="c.safetensors", mode="sum Twice",
           alpha=0.2, beta=0.7, weights_alpha="GRAD_V", weights_beta="ALL:0.5, OUT:1", dtype="bf16", prune=True),
    Recipe(model_a="a.safetensors", model_b="b.safetensors", model_c="c.safetensors", mode="Add difference",
           calcmode="extract", gamma=2.5, elemental="OUT03:attn2:0.5", include_exclude="exclude",
           include_exclude_blocks="IN04 VAE", include_exclude_elements="attn2, ff.net",
           adjust="1,0,0,0,0,0,0,0", bake_vae="vae.safetensors", reset_clip=True),
    Recipe(model_a="a.safetensors", model_b="b.safetensors", calcmode="plus random", seed=42,
           dice=Dice(mode="X", seed=7, round=2, upper="0.8", lower="0.1", alpha=True, beta=True),
           weights_beta="FLAT_25", elemental_extended=True),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_round_trips_through_the_tab(recipe):
    assert recipe_from_ui(ui_from_recipe(recipe)) == recipe


def test_recipe_from_ui_without_mbw_ignores_the_weight_boxes():
    values = {**default_values(), "model_a": "a", "model_b": "b", "weights_alpha": "nonsense"}
    assert recipe_from_ui(values).weights_alpha is None
    assert recipe_from_ui({**values, "use_block_weights": True}).weights_alpha == "nonsense"


# --- the build ---------------------------------------------------------------------------------


def test_the_tab_builds(actions):
    import gradio as gr

    from mergers.ui import build_tab
    tab = build_tab(actions.session)
    assert isinstance(tab, gr.Blocks)
    labels = {getattr(block, "label", None) for block in tab.blocks.values()}
    assert {"Model A", "Model B", "Model C", "Merge Mode", "Calculation Mode", "alpha", "beta"} <= labels


def test_the_tab_builds_under_gradio_3(models_root, tmp_path):
    out = run_under_gradio3(GRADIO3_BUILD, models_root / "models", tmp_path / "d", folder=tmp_path)
    assert out.startswith("gradio 3.41.2 ok")


# Built with Gradio 3.41.2: any argument it does not know is a warning there ("unused kwarg"): fail on it.
GRADIO3_BUILD = '''
import sys, warnings
from pathlib import Path
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradio as gr
    from tests.ui_host import UiHost
    from mergers.session import MergeSession
    from mergers.ui import build_tab, make_app
    session = MergeSession(UiHost(Path(sys.argv[1]), Path(sys.argv[2])))
    build_tab(session)
    make_app(session)
unknown = [str(w.message) for w in caught if "kwarg" in str(w.message)]
assert not unknown, unknown
print("gradio", gr.__version__, "ok")
'''


# --- handlers ----------------------------------------------------------------------------------


def test_merge_shows_the_summary_and_changes_the_live_weights(actions, host):
    before = weights_checksum(host.live_model().tensors())
    outputs = actions.merge(values_for(actions, alpha=0.3))
    assert plain(outputs["message"]).startswith("a x 0.7 + b x 0.3 (ID 1): 1130 keys merged, swapped into the loaded")
    assert weights_checksum(host.live_model().tensors()) != before
    assert outputs["history_table"][0][0] == 1


def test_a_bad_weight_string_is_a_message_and_leaves_the_model(actions, host):
    before = weights_checksum(host.live_model().tensors())
    outputs = actions.merge(values_for(actions, use_block_weights=True, weights_alpha="0.5,abc"))
    assert outputs == {"message": "value 2 ('abc') is not a number"}
    assert "Traceback" not in outputs["message"]
    assert weights_checksum(host.live_model().tensors()) == before


def test_merge_and_gen_previews_the_merged_model(actions, host):
    first = actions.generate(values_for(actions))
    outputs = actions.merge_and_generate(values_for(actions, **{"gen.prompt": "a dog", "gen.steps": 9}))
    assert "keys merged" in outputs["message"] and "generated 1 image" in outputs["message"]
    assert outputs["gallery"][0].getpixel((0, 0)) != first["gallery"][0].getpixel((0, 0))
    assert (host.generated[-1].prompt, host.generated[-1].steps) == ("a dog", 9)
    assert "SuperMerger ID: 1" in outputs["infotext"]


def test_mode_change_offers_only_its_calcmodes(actions):
    outputs = actions.change_mode({"mode": "Add difference", "calcmode": "cosineA"})
    assert outputs["calcmode"]["choices"] == ["normal", "trainDifference", "smoothAdd", "smoothAdd MT", "extract",
                                              "A1111", "sd-mecha"]  # the last two: other tools' arithmetic
    assert outputs["calcmode"]["value"] == "normal"
    assert outputs["beta"]["interactive"] is False and outputs["model_c"]["interactive"] is True
    outputs = actions.change_mode({"mode": "Weight sum", "calcmode": "tensor"})
    assert outputs["calcmode"]["value"] == "tensor" and outputs["beta"]["interactive"] is True
    assert outputs["model_c"]["interactive"] is False


def test_sdxl_model_a_hides_six_sliders(actions):
    xl = next(t for t in actions.model_titles() if t.startswith("xl."))
    outputs = actions.change_model_a({"model_a": xl, "include_exclude_blocks": ["IN10", "OUT01"]})
    assert outputs["layout"] == "sdxl"
    hidden = {name for name in SLIDER_NAMES if outputs.get(name, {}).get("visible") is False}
    assert hidden == {slider_name(b) for b in HIDDEN_FOR_SDXL} and len(hidden) == 6
    assert outputs["include_exclude_blocks"]["value"] == ["OUT01"]
    sd1 = actions.change_model_a({"model_a": actions.model_titles()[0]})
    assert sd1["layout"] == "sd1" and all(sd1[slider_name(b)]["visible"] for b in HIDDEN_FOR_SDXL)


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_set_and_read_round_trip(actions, layout):
    sliders = actions.read_weights({"weights_alpha": "GRAD_V", "layout": layout}, source="weights_alpha")
    text = actions.set_weights({**sliders, **{n: 0.0 for n in SLIDER_NAMES if n not in sliders}, "layout": layout},
                               target="weights_beta")["weights_beta"]
    assert len(text.split(",")) == (26 if layout == "sd1" else 20)
    assert actions.read_weights({"weights_beta": text, "layout": layout}, source="weights_beta") == sliders
    assert actions.apply_preset({"preset": "GRAD_V", "layout": layout}) == sliders


def test_read_of_a_bad_box_is_a_message(actions):
    outputs = actions.read_weights({"weights_alpha": "GRAD_W", "layout": "sd1"}, source="weights_alpha")
    assert "unknown preset 'GRAD_W'; did you mean GRAD_V" in plain(outputs["message"])


def test_history_load_fills_the_tab(actions):
    values = values_for(actions, mode="Add difference", model_c="c", alpha=0.7, use_block_weights=True,
                        weights_alpha="GRAD_V", adjust="0,0,0,0,1,0,0,0")
    actions.merge(values)
    actions.merge(values_for(actions))
    outputs = actions.load_history({"history_id": 1})
    loaded = {name: value_of(outputs[name]) for name in FIELD_NAMES}
    assert loaded == ui_from_recipe(actions.session.history.get(1).recipe, titles=actions.title_for)
    assert (loaded["mode"], loaded["model_c"], loaded["alpha"]) == ("Add difference", values["model_c"], 0.7)
    assert loaded["weights_alpha"] == "GRAD_V" and loaded["use_block_weights"] is True
    assert outputs["calcmode"]["choices"][1] == "trainDifference"
    assert "ID 1" in outputs["message"]
    assert value_of(actions.load_history({"history_id": -1})["mode"]) == "Weight sum"
    assert "no merge with ID 9" in actions.load_history({"history_id": 9})["message"]
    assert "not a whole number" in actions.load_history({"history_id": "x"})["message"]


def test_history_search(actions):
    actions.merge(values_for(actions, alpha=0.3))
    actions.merge(values_for(actions, model_b="c", alpha=0.6))
    rows = actions.search_history({"history_search": "c.safetensors", "history_match": "and"})["history_table"]
    assert [row[0] for row in rows] == [2]
    assert len(actions.search_history({})["history_table"]) == 2


def test_save_writes_under_models_dir(actions, host):
    assert "merge first" in actions.save({"save_name": "x"})["message"]
    actions.merge(values_for(actions))
    outputs = actions.save({"save_name": "saved merge", "dtype": "fp16", "prune": True, "bake_vae": ""})
    assert (host.models_dir / "saved merge.safetensors").is_file()
    assert "saved" in outputs["message"]
    default = actions.save({"save_name": "", "dtype": "as model A"})
    assert (host.models_dir / "ax0.5+bx0.5.safetensors").is_file(), default
    assert "exists" in actions.save({"save_name": "saved merge"})["message"]
    assert "not a plain file name" in actions.save({"save_name": "../escape"})["message"]


def test_restore_puts_the_original_back(actions, host):
    before = weights_checksum(host.live_model().tensors())
    actions.merge(values_for(actions))
    assert "restored" in actions.restore()["message"]
    assert weights_checksum(host.live_model().tensors()) == before
    assert actions.restore()["message"] == "nothing to restore"


def test_a_second_merge_while_one_runs_is_refused(actions, host):
    started, release = threading.Event(), threading.Event()

    def hold(done, total, key):
        started.set()
        release.wait(10)

    first = {}
    worker = threading.Thread(target=lambda: first.update(actions.merge(values_for(actions), on_progress=hold)))
    worker.start()
    try:
        assert started.wait(10)
        assert "already running" in actions.merge(values_for(actions, alpha=0.9))["message"]
        assert "already running" in actions.restore()["message"]
    finally:
        release.set()
        worker.join(10)
    assert "keys merged" in first["message"]


def test_stop_cancels_a_running_merge(actions, host):
    before = weights_checksum(host.live_model().tensors())

    def stop_at_the_first_key(done, total, key):
        actions.stop()  # as the Stop button does, from another request

    outputs = actions.merge(values_for(actions), on_progress=stop_at_the_first_key)
    assert "cancel" in outputs["message"].lower() and "keys merged" not in outputs["message"]
    assert weights_checksum(host.live_model().tensors()) == before


def test_unknown_model_is_named(actions):
    outputs = actions.merge(values_for(actions, model_b="nope.safetensors"))
    assert outputs["message"].startswith("Model B: ")


def test_unexpected_errors_are_one_line(actions, monkeypatch):
    monkeypatch.setattr(actions.session, "merge", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    message = actions.merge(values_for(actions))["message"]
    assert "disk gone" in message and "\n" not in message
