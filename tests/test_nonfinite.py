"""No NaN/Inf merge reaches the loaded model or a file unnoticed; warnings and the swap state reach the user.

Issue 21: a swap that meets NaN/Inf stops, leaves the model bit for bit as it was and names the key,
method and source; a save refuses the same way unless allowed (and then warns); warnings reach the API's
answer, the tab's message and the history; ``GET /state`` follows merge → restore → checkpoint change;
XYZ plots and searches can restore the model at their end.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mergers.api import PREFIX, make_router
from mergers.demo import tiny_state_dict
from mergers.errors import MergeError, NonFiniteError
from mergers.hosts.standalone import FolderHost
from mergers.recipe import Recipe
from mergers.search import SearchSpec, run_search
from mergers.session import MergeSession
from mergers.ui.fields import default_values
from mergers.ui.handlers import ALLOW_NON_FINITE, MESSAGE, TabActions
from mergers.writer import save_checkpoint
from mergers.xyz import AxisSpec, PlotOptions, PlotRunner, PlotSpec, build_plan, context_for
from tests import test_a1111
from tests.live_model import FakeLive
from tests.ui_host import UiHost

checkpoints, webui = test_a1111.checkpoints, test_a1111.webui  # the A1111 stand-in's fixtures

NAN_KEY = "model.diffusion_model.out.2.weight"
NAN_RECIPE = {"model_a": "a.safetensors", "model_b": "nan.safetensors", "alpha": 0.5}
# fp16 models: A + 1e5·(B − C) passes fp16's range (65504) where B ≠ C — finite inputs, an Inf result.
OVERFLOW_RECIPE = {"model_a": "a.safetensors", "model_b": "b.safetensors", "model_c": "c.safetensors",
                   "mode": "Add difference", "alpha": 100000.0}


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


def write_nan_model(folder: Path, seed: int = 2) -> Path:
    """A tiny SD1 model whose ``NAN_KEY`` holds one NaN (the others are finite)."""
    state = tiny_state_dict("sd1", seed=seed)
    state[NAN_KEY] = state[NAN_KEY].clone()
    state[NAN_KEY].view(-1)[3] = float("nan")
    return save_checkpoint(folder / "nan.safetensors", state)


@pytest.fixture
def host(tmp_path) -> UiHost:
    host = UiHost.create(tmp_path)
    write_nan_model(host.models_dir)
    return host


@pytest.fixture
def session(host) -> MergeSession:
    return MergeSession(host)


def client_for(session: MergeSession) -> TestClient:
    app = FastAPI()
    app.include_router(make_router(session))
    return TestClient(app)


def same_bits(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(
        torch.equal(before[k].reshape(-1).view(torch.uint8), after[k].reshape(-1).view(torch.uint8)) for k in before)


# --- the swap -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, source", [(NAN_RECIPE, "model B holds NaN/Inf there"),
                                            (OVERFLOW_RECIPE, "passes the range of float16")])
def test_a_nan_merge_leaves_the_model_bit_identical_and_the_api_names_the_key(session, host, recipe, source):
    before = host.live_model().snapshot()
    response = client_for(session).post(PREFIX + "/merge", json={"recipe": recipe})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "merged result is not finite" in detail and source in detail
    assert ("Weight sum" if recipe is NAN_RECIPE else "Add difference") in detail  # the method
    key = re.escape(NAN_KEY) if recipe is NAN_RECIPE else r"[\w.]+"
    assert re.match(rf"'{key}': merged result", detail)  # the key comes first
    assert "put back" in detail and "allow_non_finite" in detail
    assert same_bits(before, host.live_model().snapshot())
    assert session.history.entries() == []  # a refused merge is no merge
    assert client_for(session).get(PREFIX + "/state").json()["merged"] is False


def test_a_nan_merge_after_a_good_one_goes_back_to_the_checkpoint(session, host):
    before = host.live_model().snapshot()
    session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    with pytest.raises(NonFiniteError, match=NAN_KEY) as refused:
        session.merge(Recipe.from_dict(NAN_RECIPE))
    assert refused.value.key == NAN_KEY and refused.value.method == "Weight sum"
    assert same_bits(before, host.live_model().snapshot())
    assert session.state()["merged"] is False and session.infotext() == {}


def test_the_a1111_stand_in_is_left_bit_identical(webui, tmp_path):
    """In the A1111 stand-in with --api: the refused merge's 400, and the loaded model unchanged."""
    from mergers.swap import live_tensors

    write_nan_model(webui.data / "models" / "Stable-diffusion")
    webui.shared.cmd_opts.api = True
    webui.scripts.load_scripts()
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    before = {k: t.detach().clone() for k, t in live_tensors(webui.model).items()}
    response = TestClient(app).post(PREFIX + "/merge", json={"recipe": NAN_RECIPE})
    assert response.status_code == 400 and NAN_KEY in response.json()["detail"]
    assert same_bits(before, {k: t.detach() for k, t in live_tensors(webui.model).items()})


def test_a_nan_tensor_from_another_feature_is_refused_too(session, host):
    """apply_stream (the LoRA tab's "Apply to loaded model") checks what it swaps in."""
    before = host.live_model().snapshot()
    good = {key: tensor + 1 for key, tensor in before.items() if tensor.is_floating_point()}
    bad = dict(good, **{NAN_KEY: torch.full_like(good[NAN_KEY], float("inf"))})
    with pytest.raises(NonFiniteError, match=rf"model \+ lora: '{re.escape(NAN_KEY)}'.*put back"):
        session.apply_stream("model + lora", lambda cancel: iter(bad.items()))
    assert same_bits(before, host.live_model().snapshot())


# --- saving ---------------------------------------------------------------------------------------


def test_a_save_refuses_nan_unless_allowed_and_then_warns_in_the_answer_and_history(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        save_checkpoint(folder / f"{name}.safetensors", tiny_state_dict("sd1", seed=seed))
    write_nan_model(folder)
    session = MergeSession(FolderHost(folder, data_dir=tmp_path / "data"))  # no loaded model: merges are saved
    client = client_for(session)
    refused = client.post(PREFIX + "/merge", json={"recipe": NAN_RECIPE, "output": "nan_merge"})
    assert refused.status_code == 400 and NAN_KEY in refused.json()["detail"]
    assert "Nothing was saved" in refused.json()["detail"]
    assert not (folder / "nan_merge.safetensors").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith("nan_merge")] == []  # no temp file either
    body = client.post(PREFIX + "/merge", json={"recipe": NAN_RECIPE, "output": "nan_merge",
                                                "allow_non_finite": True}).json()
    assert body["saved"] == "nan_merge.safetensors" and (folder / "nan_merge.safetensors").is_file()
    assert len(body["warnings"]) == 1 and NAN_KEY in body["warnings"][0]
    entry = session.history.get(body["history_id"])
    assert entry.extra["warnings"] == body["warnings"]
    listed = client.get(PREFIX + "/history").json()[0]
    assert listed["extra"]["warnings"] == body["warnings"]


def test_the_cli_refuses_nan_unless_allowed(tmp_path, capsys):
    from mergers.cli import main

    for name, seed in (("a", 1),):
        save_checkpoint(tmp_path / f"{name}.safetensors", tiny_state_dict("sd1", seed=seed))
    nan = write_nan_model(tmp_path)
    args = ["merge", str(tmp_path / "a.safetensors"), str(nan), "-o", str(tmp_path / "out.safetensors")]
    assert main(args) == 2
    assert NAN_KEY in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()
    assert main([*args, "--allow-non-finite"]) == 0
    assert f"warning: {NAN_KEY!r}: merged result is not finite" in capsys.readouterr().out


# --- the tab --------------------------------------------------------------------------------------


def tab_values(**changes) -> dict:
    return {**default_values(), "model_a": "a.safetensors", "model_b": "b.safetensors", **changes}


def test_the_tabs_messages_carry_the_refusal_and_the_warnings(session, host):
    actions = TabActions(session)
    before = host.live_model().snapshot()
    refused = actions.merge(tab_values(model_b="nan.safetensors"))[MESSAGE]
    assert "merged result is not finite" in refused and "NaN" in refused
    assert "out.2.weight" in refused  # the key (Markdown escapes its underscores, if any)
    kept = actions.merge(tab_values(model_b="nan.safetensors", **{ALLOW_NON_FINITE: True}))[MESSAGE]
    assert "NOT swapped in" in kept and "warning:" in kept
    assert same_bits(before, host.live_model().snapshot())
    entry = session.history.get(-1)
    assert len(entry.extra["warnings"]) == 1 and NAN_KEY in entry.extra["warnings"][0]
    refused = actions.save({"save_name": "nan keep"})[MESSAGE]  # without the box: refused, naming it
    assert "Nothing was saved" in refused and 'tick "write NaN/Inf"' in refused
    assert not (host.models_dir / "nan keep.safetensors").exists()
    saved = actions.save({"save_name": "nan keep", ALLOW_NON_FINITE: True})[MESSAGE]
    assert saved.startswith("saved") and "warning:" in saved
    assert "warning:" in actions.load_history({"history_id": entry.id})[MESSAGE]
    assert actions.history_rows()[0][2].endswith("⚠ 1 warning")  # the History table marks it


def test_a_generation_failing_after_a_swap_says_so_and_offers_restore(session, host, monkeypatch):
    def broken(params, *, extra_info):
        raise RuntimeError("A tensor with NaNs was produced in Unet")

    monkeypatch.setattr(host, "generate", broken)
    message = TabActions(session).merge_and_generate(tab_values())[MESSAGE]
    assert "keys merged" in message and "NaNs was produced" in message
    assert "swapped into" in message and "Restore" in message
    with pytest.raises(MergeError, match="/supermerger/v1/restore"):
        session.generate(host.default_generation())


# --- the swap state --------------------------------------------------------------------------------


def test_the_state_route_follows_merge_restore_and_a_checkpoint_change(session, host):
    client = client_for(session)
    assert client.get(PREFIX + "/state").json() == {
        "merged": False, "name": None, "history_id": None, "recipe": None, "warnings": [], "changed_keys": 0,
        "checkpoint": "a.safetensors", "stack": []}
    merged = client.post(PREFIX + "/merge", json={"recipe": {"model_a": "a.safetensors", "model_b": "b.safetensors",
                                                             "alpha": 0.3}}).json()
    state = client.get(PREFIX + "/state").json()
    assert state["merged"] and state["name"] == merged["name"] and state["history_id"] == merged["history_id"]
    assert state["recipe"] == merged["recipe"] and state["changed_keys"] > 0 and state["warnings"] == []
    assert state["stack"] == [{"kind": "merge", "name": merged["name"], "history_id": merged["history_id"]}]
    client.post(PREFIX + "/restore")
    assert client.get(PREFIX + "/state").json()["merged"] is False
    session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.7))
    assert client.get(PREFIX + "/state").json()["merged"] is True
    host._live = FakeLive.load(host.models_dir / "b.safetensors")  # the web UI loaded another checkpoint
    state = client.get(PREFIX + "/state").json()
    assert state["merged"] is False and state["checkpoint"] == "b.safetensors"


def test_an_xyz_plot_can_restore_the_model_at_its_end(session, host):
    before = host.live_model().snapshot()
    base = Recipe(model_a="a.safetensors", model_b="b.safetensors")
    for restore in (False, True):
        spec = PlotSpec(base, host.default_generation(), x=AxisSpec("alpha", "0.2,0.8"),
                        options=PlotOptions(restore=restore))
        result = PlotRunner(session).run(build_plan(spec, context_for(base, host.resolve, session.history)))
        assert result.complete and result.error is None
        assert same_bits(before, host.live_model().snapshot()) is restore
    assert "restored to its checkpoint" in result.summary and session.state()["merged"] is False
    assert PlotSpec.from_dict(spec.to_dict()).options.restore  # the plan file keeps the option


def test_a_search_can_restore_the_model_at_its_end(session, host):
    before = host.live_model().snapshot()
    spec = SearchSpec(Recipe(model_a="a.safetensors", model_b="b.safetensors"), host.default_generation(),
                      blocks=("IN04", "M00"), budget=2, restore=True)
    result = run_search(session, spec, lambda images, params: 1.0)
    assert result.restored and result.final_history_id is None and "restored" in result.summary
    assert same_bits(before, host.live_model().snapshot())
    assert result.to_dict()["restored"] is True
