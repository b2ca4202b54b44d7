"""The HTTP API (mergers.api) through FastAPI's TestClient: every route, its happy path and its refusals.

Three hosts: the test host with a loaded model (merges swap in, previews paint), the
standalone FolderHost (merges are saved), and A1111's glue on the v1.10 stand-in
(``--api`` and ``--api-auth``). The same routes under Gradio 3.41's FastAPI 0.94 and
pydantic 1 run in a subprocess of the .venv-g3 interpreter, as tests/test_ui.py does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient's transport

from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from mergers.api import (
    PREFIX,
    GenerationRequest,
    MergeSlot,
    basic_auth,
    field_at_fault,
    generation_params,
    is_path_like,
    json_safe,
    make_router,
    parse_api_auth,
)
from mergers.checkpoint import open_checkpoint
from mergers.errors import CheckpointError, MergeError
from mergers.hashing import sha256_of_file
from mergers.host import GenerationParams
from mergers.hosts.standalone import FolderHost
from mergers.metadata import stored_recipe
from mergers.session import MergeSession
from tests import test_a1111
from tests.gradio3 import run_under_gradio3
from tests.platforms import needs_extension_link, needs_gradio
from tests.ui_host import UiHost, weights_checksum

ROOT = Path(__file__).resolve().parents[1]

RECIPE = {"model_a": "a.safetensors", "model_b": "b.safetensors", "alpha": 0.3}
checkpoints, webui = test_a1111.checkpoints, test_a1111.webui  # the A1111 stand-in's fixtures
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the loopback, whatever http_proxy says
ROUTES = {"/models": {"get"}, "/presets": {"get"}, "/history": {"get"}, "/merge": {"post"},
          "/merge-and-generate": {"post"}, "/analyze": {"post"}, "/restore": {"post"}, "/progress": {"get"},
          "/cancel": {"post"}, "/search": {"post"}, "/search/stop": {"post"}, "/state": {"get"}, "/license": {"get"},
          "/architectures": {"get"}}


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    UiHost.create(root)
    return root


@pytest.fixture
def host(models_root, tmp_path) -> UiHost:
    """The test host: a loaded model (merges swap in) and a fake generator."""
    return UiHost(models_root / "models", tmp_path / "data")


@pytest.fixture
def session(host) -> MergeSession:
    return MergeSession(host)


def client_for(session: MergeSession, **options) -> TestClient:
    app = FastAPI()
    app.include_router(make_router(session, **options))
    return TestClient(app)


@pytest.fixture
def client(session) -> TestClient:
    return client_for(session)


@pytest.fixture
def folder_client(models_root, tmp_path) -> tuple[TestClient, FolderHost]:
    """The standalone host over a copy of the models (saves land there): no loaded model."""
    folder = tmp_path / "models"
    folder.mkdir()
    for path in (models_root / "models").glob("*.safetensors"):
        (folder / path.name).write_bytes(path.read_bytes())
    host = FolderHost(folder, data_dir=tmp_path / "data")
    return client_for(MergeSession(host)), host


def post(client: TestClient, route: str, **body):
    return client.post(PREFIX + route, json=body)


def loc_of(response) -> list:
    """The ``loc`` of a field refusal (FastAPI's validation shape)."""
    detail = response.json()["detail"]
    assert isinstance(detail, list), detail
    return detail[0]["loc"]


# --- the description -----------------------------------------------------------------------------


def test_openapi_lists_every_route_with_its_schemas(client):
    schema = client.get("/openapi.json").json()
    paths = {path[len(PREFIX):]: set(methods) for path, methods in schema["paths"].items()}
    assert paths == ROUTES
    merge = schema["paths"][PREFIX + "/merge"]["post"]
    assert merge["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/MergeRequest")
    assert merge["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/MergeResponse")
    assert {"200", "403", "404", "409", "422"} <= set(merge["responses"])
    components = schema["components"]["schemas"]
    assert {"recipe", "output", "overwrite", "allow_non_finite"} <= set(components["MergeRequest"]["properties"])
    assert "warnings" in components["MergeResponse"]["properties"]
    assert {"images", "infotext", "sha256", "seconds"} <= set(components["GenerateResponse"]["properties"])


# --- lists ---------------------------------------------------------------------------------------


def test_models_lists_titles_files_and_short_hashes(client, host):
    models = client.get(PREFIX + "/models").json()
    assert [m["file"] for m in models] == ["a.safetensors", "b.safetensors", "c.safetensors", "xl.safetensors"]
    assert models[0]["title"] == f"a.safetensors [{models[0]['shorthash']}]"
    assert str(host.models_dir) not in str(models)  # no server paths


def test_presets_include_the_originals(client):
    presets = {p["name"]: p["weights"] for p in client.get(PREFIX + "/presets").json()}
    assert presets["GRAD_V"].split(",")[:3] == ["0", "1", "0.9166666667"]
    assert len(presets["FLAT_25"].split(",")) == 26


def test_architectures_list_every_recognised_model_with_its_blocks(client):
    found = {a["name"]: a for a in client.get(PREFIX + "/architectures").json()}
    assert found["qwen_image"]["label"] == "Qwen-Image" and found["qwen_image"]["blocks"][:3] == ["TE", "IN", "T00"]
    assert found["sdxl"]["lora"] and not found["wan"]["lora"]
    assert len(found["flux"]["blocks"]) == 61


def test_history_lists_merges_newest_first_and_searches(client):
    post(client, "/merge", recipe=RECIPE)
    post(client, "/merge", recipe={**RECIPE, "model_b": "c.safetensors"})
    entries = client.get(PREFIX + "/history").json()
    assert [e["id"] for e in entries] == [2, 1]
    assert entries[0]["recipe"]["model_b"] == "c.safetensors" and entries[0]["name"] == "a x 0.7 + c x 0.3"
    found = client.get(PREFIX + "/history", params={"search": "b.safetensors"}).json()
    assert [e["id"] for e in found] == [1]
    assert len(client.get(PREFIX + "/history", params={"limit": 1}).json()) == 1
    refused = client.get(PREFIX + "/history", params={"match": "xor"})
    assert refused.status_code == 422 and loc_of(refused) == ["query", "match"]


# --- merge ---------------------------------------------------------------------------------------


def test_merge_swaps_into_the_loaded_model(client, host):
    before = weights_checksum(host.live_model().tensors())
    response = post(client, "/merge", recipe={**RECIPE, "calcmode": "plus random"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["swapped"] and body["saved"] is None and body["sha256"] is None
    assert body["name"].startswith("a x 0.7 + b x 0.3") and body["history_id"] == 1
    assert body["recipe"]["seed"] != -1  # the recipe as run: its seed drawn and recorded
    assert body["architecture"] == "SD1.x" and body["merged_keys"] > 500
    assert set(body["models"]) == {"model_a", "model_b"} and body["models"]["model_a"]["name"] == "a.safetensors"
    listed = {m["file"]: m["shorthash"] for m in client.get(PREFIX + "/models").json()}
    assert body["models"]["model_b"]["shorthash"] == listed["b.safetensors"]  # as the host knows it
    assert body["seconds"]["merge"] > 0 and body["seconds"]["total"] >= body["seconds"]["merge"]
    assert weights_checksum(host.live_model().tensors()) != before


def test_merge_with_an_output_saves_it_and_returns_its_hashes(client, host):
    body = post(client, "/merge", recipe={**RECIPE, "weights_alpha": "GRAD_V"}, output="api merge").json()
    path = host.models_dir / "api merge.safetensors"
    try:
        assert body["swapped"] and body["saved"] == path.name
        assert body["sha256"] == sha256_of_file(path) and body["shorthash"] == body["sha256"][:10]
        with open_checkpoint(path) as ckpt:
            recipe, models = stored_recipe(ckpt.metadata)
        assert recipe.weights_alpha == "GRAD_V"
        assert {role: m["sha256"] for role, m in body["models"].items()} == {
            role: m["sha256"] for role, m in models.items()}  # the inputs' hashes, from the merge's own reads
        assert body["models"]["model_a"]["shorthash"] == models["model_a"]["sha256"][:10]
        assert body["seconds"]["save"] > 0 and body["seconds"]["hash"] is not None
    finally:
        path.unlink(missing_ok=True)


def test_without_a_loaded_model_the_merge_is_saved(folder_client):
    client, host = folder_client
    body = post(client, "/merge", recipe=RECIPE).json()
    assert not body["swapped"] and body["saved"] == "ax0.7+bx0.3.safetensors"  # the merge's name, as Save makes it
    assert (host.models_dir / body["saved"]).is_file()
    assert body["saved"] in {m["file"] for m in client.get(PREFIX + "/models").json()}  # now pickable


def test_a_long_default_name_is_cut_without_a_double_dot(folder_client):
    client, host = folder_client
    body = post(client, "/merge", recipe={**RECIPE, "weights_alpha": "GRAD_V"}).json()
    assert body["saved"].endswith(".safetensors") and ".." not in body["saved"]
    assert (host.models_dir / body["saved"]).is_file()


# --- refusals: names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "~/a.safetensors", "models/../a.safetensors",
                                  "C:\\models\\a.safetensors", "..\\..\\a.safetensors"])
def test_a_model_path_is_refused(client, name):
    response = post(client, "/merge", recipe={**RECIPE, "model_b": name})
    assert response.status_code == 403
    assert loc_of(response) == ["body", "recipe", "model_b"] and "is a path" in response.json()["detail"][0]["msg"]


def test_an_unknown_model_is_404_naming_it(client):
    response = post(client, "/merge", recipe={**RECIPE, "model_a": "nothing.safetensors"})
    assert response.status_code == 404 and loc_of(response) == ["body", "recipe", "model_a"]
    assert "nothing.safetensors" in response.json()["detail"][0]["msg"]


class PathHost(UiHost):
    """A host whose resolve also takes any existing file (as A1111's falls back to a path)."""

    def resolve(self, name: str) -> Path:
        try:
            return super().resolve(name)
        except CheckpointError:
            if Path(name).is_file():
                return Path(name)
            raise


def test_a_file_outside_the_folders_is_refused_even_when_the_host_finds_it(models_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((models_root / "models" / "b.safetensors").read_bytes())
    client = client_for(MergeSession(PathHost(models_root / "models", tmp_path / "data")))
    response = post(client, "/merge", recipe={**RECIPE, "model_b": "outside.safetensors"})
    assert response.status_code == 403 and "not a model in the configured model folders" in response.text


def test_bake_vae_must_be_listed_too(client):
    response = post(client, "/merge", recipe={**RECIPE, "bake_vae": "../vae.safetensors"})
    assert response.status_code == 403 and loc_of(response) == ["body", "recipe", "bake_vae"]


@pytest.mark.parametrize("output", ["../escaped", "/tmp/escaped", "sub/escaped", "..\\escaped", "~/escaped"])
def test_an_output_that_leaves_the_folder_is_refused(client, host, output):
    response = post(client, "/merge", recipe=RECIPE, output=output)
    assert response.status_code == 403 and loc_of(response) == ["body", "output"]
    assert host.live_model() is not None and client.get(PREFIX + "/history").json() == []  # refused before merging


def test_an_output_that_is_not_a_file_name_is_422(client):
    response = post(client, "/merge", recipe=RECIPE, output="bad*name?")
    assert response.status_code == 422 and loc_of(response) == ["body", "output"]


def test_an_existing_output_needs_overwrite(client, host):
    target = host.models_dir / "exists.safetensors"
    target.write_bytes((host.models_dir / "c.safetensors").read_bytes())
    try:
        refused = post(client, "/merge", recipe=RECIPE, output="exists")
        assert refused.status_code == 409 and loc_of(refused) == ["body", "output"]
        replaced = post(client, "/merge", recipe=RECIPE, output="exists", overwrite=True)
        assert replaced.status_code == 200 and replaced.json()["sha256"] == sha256_of_file(target)
    finally:
        target.unlink()


# --- refusals: bodies and recipes ----------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"alpha": "lots"}, "alpha"),
    ({"mode": "Weight average"}, "mode"),
    ({"calcmode": "trainDifference"}, "calcmode"),
    ({"mode": "Add difference"}, "model_c"),
    ({"dtype": "fp8"}, "dtype"),
    ({"seed": 1.5}, "seed"),
    ({"prune": "yes"}, "prune"),
    ({"include_exclude": "sometimes"}, "include_exclude"),
    ({"dice": {"mode": "Q"}}, "dice"),
    ({"dice": {"colour": "red"}}, "dice"),
    ({"model_b": ""}, "model_b"),
    ({"weights_beta": "GRAD_Q", "mode": "sum Twice", "model_c": "c.safetensors"}, "weights_beta"),
    ({"weights_alpha": "0,1,2"}, "weights_alpha"),
    ({"elemental": "NOWHERE:attn2:0.5"}, "elemental"),
])
def test_an_invalid_recipe_is_422_naming_the_field(client, host, change, field):
    before = weights_checksum(host.live_model().tensors())
    response = post(client, "/merge", recipe={**RECIPE, **change})
    assert response.status_code == 422, response.text
    assert loc_of(response) == ["body", "recipe", field], response.json()
    assert weights_checksum(host.live_model().tensors()) == before


def test_an_unknown_recipe_field_is_422(client):
    response = post(client, "/merge", recipe={**RECIPE, "alpah": 0.3})
    assert response.status_code == 422 and "alpah" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("body", ['{"recipe": ', '[1, 2]', '{"recipe": "a+b"}', '{"recipe": {}, "speed": "fast"}',
                                  '{}'])
def test_bad_json_or_shape_is_422(client, body):
    response = client.post(PREFIX + "/merge", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][0] == "body"


def test_a_merge_of_different_architectures_is_422(client):
    response = post(client, "/merge", recipe={**RECIPE, "model_b": "xl.safetensors"})
    assert response.status_code == 422 and "SDXL" in response.text


# --- one merge at a time, progress, cancel -------------------------------------------------------


def merge_in_background(client: TestClient, **body) -> tuple[threading.Thread, dict]:
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(response=post(client, "/merge", **body)))
    worker.start()
    return worker, result


def wait_until_merging(client: TestClient) -> dict:
    for _ in range(600):  # up to 30 s: CI runs this beside other test processes
        progress = client.get(PREFIX + "/progress").json()
        if progress["running"]:
            return progress
        threading.Event().wait(0.05)
    pytest.fail("the merge never started")


def test_a_second_merge_while_one_runs_is_409(client, host, session):
    host.lock().acquire()  # the swap waits for the host's lock, as a merge waits for A1111's txt2img
    try:
        worker, first = merge_in_background(client, recipe=RECIPE)
        progress = wait_until_merging(client)
        assert progress["phase"] == "merging" and progress["seconds"] >= 0
        second = post(client, "/merge", recipe={**RECIPE, "alpha": 0.9})
        assert second.status_code == 409 and "already running" in second.json()["detail"]
        assert client.post(PREFIX + "/restore").status_code == 409  # the session's own rule
    finally:
        host.lock().release()
        worker.join(20)
    assert first["response"].status_code == 200
    assert client.get(PREFIX + "/progress").json() == {"running": False, "phase": "idle", "done": 0, "total": 0,
                                                       "key": "", "seconds": 0.0}


def test_a_merge_from_the_tab_makes_the_api_wait_its_turn(client, session):
    with session._running():  # what the tab's Merge holds while it runs
        response = post(client, "/merge", recipe=RECIPE)
    assert response.status_code == 409 and "already running" in response.json()["detail"]


def test_cancel_stops_the_running_merge_and_leaves_the_model(client, host):
    before = weights_checksum(host.live_model().tensors())
    host.lock().acquire()
    try:
        worker, first = merge_in_background(client, recipe=RECIPE)
        wait_until_merging(client)
        assert client.post(PREFIX + "/cancel").json() == {"cancelled": True}
    finally:
        host.lock().release()
        worker.join(20)
    assert first["response"].status_code == 409 and "cancel" in first["response"].text.lower()
    assert weights_checksum(host.live_model().tensors()) == before
    assert client.post(PREFIX + "/cancel").json() == {"cancelled": False}


def test_progress_reports_the_keys_of_each_phase(folder_client, monkeypatch):
    client, _ = folder_client
    seen = []
    original = MergeSlot.progress

    def progress_and_look(self, done, total, key):  # GET /progress from inside the merge, at its first key
        original(self, done, total, key)
        if done == 1:
            seen.append(client.get(PREFIX + "/progress").json())

    monkeypatch.setattr(MergeSlot, "progress", progress_and_look)
    post(client, "/merge", recipe=RECIPE)  # no loaded model: merged (planned), then saved
    assert [p["phase"] for p in seen] == ["merging", "saving"][-len(seen):] and seen[-1]["phase"] == "saving"
    assert all(p["running"] and p["done"] == 1 and p["total"] > 1000 and p["key"] for p in seen)


# --- restore ---------------------------------------------------------------------------------------


def test_restore_puts_the_original_back(client, host):
    before = weights_checksum(host.live_model().tensors())
    assert client.post(PREFIX + "/restore").json() == {"restored": 0}
    post(client, "/merge", recipe=RECIPE)
    restored = client.post(PREFIX + "/restore").json()["restored"]
    assert restored > 1000 and weights_checksum(host.live_model().tensors()) == before


# --- merge and generate -----------------------------------------------------------------------------


def test_merge_and_generate_returns_png_images_of_the_merged_model(client, host):
    response = post(client, "/merge-and-generate", recipe=RECIPE, generation={"prompt": "a dog", "batch_size": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in body["images"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)] and images[0].format == "PNG"
    assert f"checksum: {weights_checksum(host.live_model().tensors()):08x}" in body["infotext"]
    assert "SuperMerger: a x 0.7 + b x 0.3" in body["infotext"] and body["swapped"]
    params = host.generated[-1]
    assert (params.prompt, params.batch_size, params.steps) == ("a dog", 2, 4)  # steps: the host's default


def test_merge_and_generate_checks_the_parameters(client):
    response = post(client, "/merge-and-generate", recipe=RECIPE, generation={"steps": 0})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "steps"


def test_merge_and_generate_needs_a_generator(folder_client):
    client, _ = folder_client
    response = post(client, "/merge-and-generate", recipe=RECIPE)
    assert response.status_code == 501 and "no image generator" in response.json()["detail"]


# --- analyze ---------------------------------------------------------------------------------------


def test_analyze_compares_two_listed_models(client):
    pytest.importorskip("mergers.analysis")
    response = post(client, "/analyze", model_a="a.safetensors", model_b="b.safetensors")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_a"], body["model_b"], body["by"]) == ("a.safetensors", "b.safetensors", "block")
    assert body["rows"] and all(-1.0 <= row["cosine"] <= 1.0 for row in body["rows"] if row["cosine"] is not None)


def test_analyze_refuses_paths_and_unknown_groupings(client):
    pytest.importorskip("mergers.analysis")
    path = post(client, "/analyze", model_a="a.safetensors", model_b="../../etc/passwd")
    assert path.status_code == 403 and loc_of(path) == ["body", "model_b"]
    grouping = post(client, "/analyze", model_a="a.safetensors", model_b="b.safetensors", by="colour")
    assert grouping.status_code == 422 and loc_of(grouping) == ["body", "by"]
    mixed = post(client, "/analyze", model_a="a.safetensors", model_b="xl.safetensors")
    assert 400 <= mixed.status_code < 500


# --- HTTP Basic, as A1111's --api-auth ----------------------------------------------------------------


def test_basic_auth_guards_every_route(session):
    client = client_for(session, dependencies=basic_auth("user:secret,bob:p:w"))
    for route, methods in ROUTES.items():
        method = next(iter(methods))
        response = client.request(method.upper(), PREFIX + route)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Basic", route
    assert client.get(PREFIX + "/models", auth=("user", "wrong")).status_code == 401
    assert client.get(PREFIX + "/models", auth=("eve", "secret")).status_code == 401
    assert client.get(PREFIX + "/models", auth=("user", "secret")).status_code == 200
    assert client.get(PREFIX + "/models", auth=("bob", "p:w")).status_code == 200


def test_api_auth_is_read_as_a1111_reads_it():
    assert parse_api_auth("u1:p1,u2:p2") == {"u1": "p1", "u2": "p2"}
    assert basic_auth(None) == [] and basic_auth("") == []
    with pytest.raises(MergeError, match="'nocolon' is not user:password"):
        parse_api_auth("u1:p1,nocolon")


@needs_extension_link
def test_a1111_registers_the_routes_with_api_and_api_auth(webui):
    webui.shared.cmd_opts.api = True
    webui.shared.cmd_opts.api_auth = "user:secret"
    webui.scripts.load_scripts()
    (_, module), = webui.scripts.scripts_data
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get(PREFIX + "/models").status_code == 401
    auth = ("user", "secret")
    titles = [m["title"] for m in client.get(PREFIX + "/models", auth=auth).json()]
    assert titles[0].startswith("a.safetensors [")  # A1111's title: name [short hash]
    outside = str(webui.data / "models" / "Stable-diffusion" / "b.safetensors")  # A1111's resolve takes paths
    refused = client.post(PREFIX + "/merge", json={"recipe": {**RECIPE, "model_b": outside}}, auth=auth)
    assert refused.status_code == 403
    body = client.post(PREFIX + "/merge", json={"recipe": RECIPE}, auth=auth).json()
    assert body["swapped"] and module.session.current.name == body["name"]


@needs_extension_link
def test_a1111_serves_only_the_indicators_routes_without_an_api(webui):
    webui.scripts.load_scripts()
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get(PREFIX + "/models").status_code == 404  # the API needs --api
    assert client.get(PREFIX + "/state").json()["merged"] is False
    assert client.post(PREFIX + "/restore").json() == {"restored": 0}
    webui.shared.cmd_opts.gradio_auth = "me:secret"  # the page has a login, these routes would not: none
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    assert TestClient(app).get(PREFIX + "/state").status_code == 404


# --- small pure pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "is_path"), [
    ("a.safetensors", False), ("sdxl/b.safetensors", False), ("a.safetensors [0123456789]", False),
    ("0123456789", False), ("a..b.safetensors", False), ("../a", True), ("/a", True), ("~/a", True),
    ("C:/a", True), ("\\\\server\\share\\a", True), ("x/../../a", True),
])
def test_is_path_like(name, is_path):
    assert is_path_like(name) is is_path


@pytest.mark.parametrize(("message", "recipe", "field"), [
    ("alpha must be a number, not 'x'", {"alpha": "x"}, "alpha"),
    ("'Add difference' needs model C", {}, "model_c"),
    ("calculation mode 'x' does not go with 'Weight sum'", {}, "calcmode"),
    ("unknown preset 'GRAD_Q'; did you mean GRAD_V?", {"weights_alpha": "GRAD_V", "weights_beta": "GRAD_Q"},
     "weights_beta"),
    ("unknown recipe field(s): x", {}, None),
])
def test_field_at_fault(message, recipe, field):
    assert field_at_fault(message, recipe) == field


def test_json_safe_and_generation_params():
    assert json_safe({"a": [float("nan"), 1.0, float("inf")], "b": "x"}) == {"a": [None, 1.0, None], "b": "x"}
    params = generation_params(GenerationParams(prompt="p", steps=20), GenerationRequest(steps=8))
    assert (params.prompt, params.steps) == ("p", 8)


# --- the standalone app, on both Gradio lines -------------------------------------------------------


@needs_gradio
def test_the_standalone_app_serves_the_page_and_the_api(folder_client):
    from mergers.ui.app import make_server

    _, host = folder_client
    with TestClient(make_server(MergeSession(host))) as client:
        assert client.get("/").status_code == 200 and "gradio" in client.get("/").text.lower()
        assert client.get("/docs").status_code == 200
        assert set(client.get("/openapi.json").json()["paths"]) == {PREFIX + route for route in ROUTES}
        assert post(client, "/merge", recipe=RECIPE, output="standalone").json()["saved"] == "standalone.safetensors"


@needs_gradio
def test_a_script_merges_and_saves_through_python_m_mergers_ui(folder_client, tmp_path):
    """What the README promises: ``python -m mergers ui --models DIR``, then plain HTTP from a script."""
    _, host = folder_client
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "SUPERMERGER_CACHE": str(tmp_path / "cache")}
    server = subprocess.Popen([sys.executable, "-m", "mergers", "ui", "--models", str(host.models_dir), "--port",
                               str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        models = wait_for_json(base + "/models", server)
        assert "a.safetensors" in {m["file"] for m in models}
        request = urllib.request.Request(base + "/merge", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"recipe": RECIPE, "output": "from a script"}).encode())
        with NO_PROXY.open(request, timeout=60) as response:
            body = json.load(response)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode(errors="replace")
    assert body["saved"] == "from a script.safetensors", output
    assert body["sha256"] == sha256_of_file(host.models_dir / body["saved"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_json(url: str, server: subprocess.Popen, timeout_s: float = 90):
    """GET ``url`` once the server answers (it imports Gradio first: seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited: {server.communicate()[0].decode(errors='replace')}")
        try:
            with NO_PROXY.open(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"{url} did not answer in {timeout_s} s")


def test_the_api_under_gradio_3_and_pydantic_1(models_root, tmp_path):
    out = run_under_gradio3(GRADIO3_API, models_root / "models", tmp_path / "d", folder=tmp_path,
                            env={"SUPERMERGER_CACHE": str(tmp_path / "cache")})
    assert out.endswith("pydantic 1 ok")


GRADIO3_API = '''
import shutil, sys
from pathlib import Path
import pydantic
from fastapi.testclient import TestClient
from mergers.api import PREFIX
from mergers.hosts.standalone import FolderHost
from mergers.session import MergeSession
from mergers.ui.app import make_server
assert pydantic.VERSION.startswith("1."), pydantic.VERSION
folder = Path(sys.argv[2]) / "models"
shutil.copytree(sys.argv[1], folder)
with TestClient(make_server(MergeSession(FolderHost(folder, data_dir=Path(sys.argv[2]) / "data")))) as client:
    assert client.get("/").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert PREFIX + "/merge" in paths and PREFIX + "/merge-and-generate" in paths, sorted(paths)
    recipe = {"model_a": "a.safetensors", "model_b": "b.safetensors", "weights_alpha": "GRAD_V"}
    body = client.post(PREFIX + "/merge", json={"recipe": recipe, "output": "g3"}).json()
    assert body["saved"] == "g3.safetensors" and (folder / "g3.safetensors").is_file(), body
    assert body["license"]["license"] == "CreativeML OpenRAIL-M", body
    terms = client.get(PREFIX + "/license", params={"models": ["a.safetensors", "g3.safetensors"]})
    assert terms.status_code == 200 and [i["name"] for i in terms.json()["inputs"]] == ["a.safetensors", "g3.safetensors"]
    bad = client.post(PREFIX + "/merge", json={"recipe": {**recipe, "alpha": "x"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "recipe", "alpha"], bad.text
    path = client.post(PREFIX + "/merge", json={"recipe": {**recipe, "model_b": "../../etc/passwd"}})
    assert path.status_code == 403, path.text
    extra = client.post(PREFIX + "/merge", json={"recipe": recipe, "speed": "fast"})
    assert extra.status_code == 422, extra.text
from fastapi import FastAPI
from mergers.api import basic_auth, make_router
guarded = FastAPI()
guarded.include_router(make_router(MergeSession(FolderHost(folder)), dependencies=basic_auth("user:secret")))
with TestClient(guarded) as client:
    assert client.get(PREFIX + "/models").status_code == 401
    assert client.get(PREFIX + "/models", auth=("user", "secret")).status_code == 200
print("pydantic", pydantic.VERSION[0], "ok")
'''


# --- licenses ------------------------------------------------------------------------------------


def test_license_route_gives_each_inputs_terms_and_the_combined_ones(folder_client):
    client, host = folder_client
    (host.models_dir / "b.civitai.info").write_text(json.dumps(
        {"model": {"name": "Bee", "allowDerivatives": False, "allowCommercialUse": ["Image"]},
         "creator": {"username": "bob"}}), encoding="utf-8")
    body = client.get(PREFIX + "/license", params={"models": "a.safetensors,b.safetensors"}).json()
    assert [i["name"] for i in body["inputs"]] == ["a.safetensors", "b.safetensors"]
    assert body["license"] == "CreativeML OpenRAIL-M" and body["terms"]["allowDerivatives"] is False
    assert body["inputs"][1]["sources"]["derivatives"] == "b.civitai.info"
    assert "b.safetensors allows no derivatives: this merge should not be shared" in body["warnings"]
    repeated = client.get(PREFIX + "/license", params={"models": ["a.safetensors", "b.safetensors"]}).json()
    assert repeated == body
    merged = post(client, "/merge", recipe=RECIPE, output="ab").json()
    assert merged["license"]["terms"] == body["terms"] and merged["license"]["warnings"] == body["warnings"]


def test_license_route_refuses_paths_and_unknown_models(client):
    assert client.get(PREFIX + "/license", params={"models": "../../etc/passwd"}).status_code == 403
    unknown = client.get(PREFIX + "/license", params={"models": ["a.safetensors", "nope.safetensors"]})
    assert unknown.status_code == 404 and loc_of(unknown) == ["query", "models", "1"]
    assert client.get(PREFIX + "/license").status_code == 422
