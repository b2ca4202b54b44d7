"""The License panel in the tabs: it follows the chosen models, shows warnings, and saves hand-set terms.

The panel's wiring is checked as Gradio calls it (the change event of a model dropdown, with the
component → value dict Gradio hands over) under Gradio 4 here and Gradio 3.41.2 in its own venv.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from mergers.checkpoint import open_checkpoint
from mergers.licenses import LICENSE_KEY, Terms
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.ui.license_panel import (
    LICENSE_INFO,
    NO_MODELS,
    LicenseActions,
    chosen_models,
    form_values,
    hand_terms,
)
from tests.gradio3 import run_under_gradio3
from tests.ui_host import UiHost


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def models(tmp_path) -> Path:
    UiHost.create(tmp_path)
    folder = tmp_path / "models"
    (folder / "b.civitai.info").write_text(json.dumps(
        {"name": "v1", "model": {"name": "Bee", "allowNoCredit": False, "allowCommercialUse": ["Image"],
                                 "allowDerivatives": False, "allowDifferentLicense": True},
         "creator": {"username": "bob"}}), encoding="utf-8")
    return folder


@pytest.fixture
def session(models, tmp_path) -> MergeSession:
    return MergeSession(UiHost(models, tmp_path / "data"))


def plain(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)


def test_the_panel_shows_each_input_the_merge_and_a_warning(session):
    shown = plain(LicenseActions(session).show({"model_a": "a.safetensors", "model_b": "b.safetensors",
                                                "mode": "Weight sum", "calcmode": "normal"})[LICENSE_INFO])
    assert "model_a a.safetensors (SD1.x): CreativeML OpenRAIL-M" in shown
    assert "from: b.civitai.info; base license from the architecture (SD1.x)" in shown
    assert ("merge: CreativeML OpenRAIL-M; credit: required; commercial use: unknown (at most: sell images); "
            "derivatives: no") in shown
    assert "⚠ **warning: b.safetensors allows no derivatives: this merge should not be shared**" in shown


def test_the_panel_counts_only_the_models_the_method_takes(session):
    values = {"model_a": "a.safetensors", "model_b": "c.safetensors", "model_c": "b.safetensors"}
    assert chosen_models({**values, "mode": "Weight sum"}) == ["a.safetensors", "c.safetensors"]
    assert "b.safetensors" not in LicenseActions(session).show({**values, "mode": "Weight sum"})[LICENSE_INFO]
    three = plain(LicenseActions(session).show({**values, "mode": "Add difference"})[LICENSE_INFO])
    assert "model_c b.safetensors" in three and "allows no derivatives" in three
    assert LicenseActions(session).show({})[LICENSE_INFO] == NO_MODELS


def test_an_unknown_model_is_said_in_the_panel(session):
    shown = LicenseActions(session).show({"model_a": "a.safetensors", "model_b": "gone.safetensors"})[LICENSE_INFO]
    assert plain(shown).startswith("license not known: ") and "gone.safetensors" in plain(shown)


def test_terms_set_by_hand_are_saved_and_used_from_then_on(session, models, tmp_path):
    actions = LicenseActions(session)
    values = {"model_a": "a.safetensors", "model_b": "b.safetensors", "mode": "Weight sum",
              "license.model": "Model B", "license.derivatives": "yes",
              "license.commercial": "all, selling the model too",
              "license.author": "bob", "license.credit": "unknown"}
    result = actions.save_terms(values)
    assert plain(result["message"]) == "saved the terms in b.license.json; used from now on"
    saved = json.loads((models / "b.license.json").read_text(encoding="utf-8"))
    assert saved == {"allowCommercialUse": ["Image", "RentCivit", "Rent", "Sell"], "allowDerivatives": True,
                     "creator": "bob"}
    shown = plain(result[LICENSE_INFO])
    assert "allows no derivatives" not in shown and "b.license.json (set by hand)" in shown
    session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors"))
    with open_checkpoint(session.save("ab")) as ckpt:
        record = json.loads(ckpt.metadata[LICENSE_KEY])
    assert record["inputs"][1]["terms"]["allowDerivatives"] is True and "allowDerivatives" not in record["terms"]
    assert record["inputs"][1]["sources"]["derivatives"] == "b.license.json (set by hand)"


def test_setting_terms_needs_a_model_and_not_a_saved_recipe(session):
    assert LicenseActions(session).save_terms({"license.model": "Model C"})["message"] == \
        "choose Model C first, then set its terms"
    assert hand_terms({}).known is False


# Gradio calls the panel through the model dropdowns' change event: the same code under Gradio 4 and 3.41.
PANEL_EVENT = '''
import re, sys
from pathlib import Path
import gradio as gr
from tests.ui_host import UiHost
from mergers.session import MergeSession
from mergers.ui.license_panel import LICENSE_INFO, NO_MODELS
from mergers.ui.tab import tab_contents

def events(blocks):
    if isinstance(blocks.fns, dict):  # Gradio 4.4x
        return [(fn, [tuple(t) for t in fn.targets]) for fn in blocks.fns.values()]
    return [(fn, [(t, dep["trigger"]) for t in dep["targets"]]) for fn, dep in zip(blocks.fns, blocks.dependencies)]

with gr.Blocks() as blocks:
    w = tab_contents(MergeSession(UiHost(Path(sys.argv[1]), Path(sys.argv[2]))))
panel = w[LICENSE_INFO]
change = [fn for fn, targets in events(blocks) if (w["model_b"]._id, "change") in targets and panel in fn.outputs]
assert len(change) == 1, change
given = {"Model A": "a.safetensors", "Model B": "b.safetensors"}
data = {component: given.get(component.label, component.value) for component in change[0].inputs}
shown = re.sub(r"\\\\(.)", r"\\1", change[0].fn(data)[panel])
assert "warning: b.safetensors allows no derivatives" in shown, shown
panels = [b for b in blocks.blocks.values() if isinstance(b, gr.Markdown) and b.value == NO_MODELS]
assert len(panels) >= 2, len(panels)  # the Merge tab's and the XYZ tab's (Auto-merge: when a generator exists)
print("gradio", gr.__version__, "panel ok")
'''


def test_the_panel_follows_model_b_under_gradio_4(models, tmp_path, monkeypatch, capsys):
    script = tmp_path / "panel_event.py"
    script.write_text(PANEL_EVENT, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", [str(script), str(models), str(tmp_path / "d")])
    runpy.run_path(str(script), run_name="panel_event")
    assert capsys.readouterr().out.strip().endswith("panel ok")


def test_the_panel_follows_model_b_under_gradio_3(models, tmp_path):
    out = run_under_gradio3(PANEL_EVENT, models, tmp_path / "d", folder=tmp_path,
                            env={"SUPERMERGER_CACHE": str(tmp_path / "cache")})
    assert out.startswith("gradio 3.41.2 panel ok")


def test_choosing_an_input_fills_the_form_with_its_terms_as_known(session):
    form = LicenseActions(session).fill_form({"model_b": "b.safetensors", "license.model": "Model B"})
    assert form == {"license.name": "", "license.author": "bob", "license.credit": "required",
                    "license.commercial": "sell images", "license.derivatives": "no",
                    "license.different_license": "yes"}
    assert form_values(Terms(commercial=("Image", "Sell")))["license.commercial"] == "unknown"
