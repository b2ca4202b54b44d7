"""POST /supermerger/v1/search and /search/stop (mergers.api over mergers.search), through FastAPI's TestClient
with the test host (a loaded model and a fake generator); and the route under Gradio 3.41's pydantic 1."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient's transport

from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from mergers.api import PREFIX, make_router, search_field_at_fault
from mergers.recipe import Recipe
from mergers.search import SCORE_LOG, scores_by_history_id
from mergers.session import MergeSession
from tests.gradio3 import run_under_gradio3
from tests.ui_host import UiHost, write_models

MODELS = {"a.safetensors": ("sd1", 1), "b.safetensors": ("sd1", 2)}
RECIPE = {"model_a": "a.safetensors", "model_b": "b.safetensors"}
BLOCKS = ["IN04", "M00", "OUT05"]


def png_base64(colour=(200, 40, 90)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search_api") / "models"
    write_models(folder, MODELS)  # SD1 only: the test host hashes every file it lists, on each lookup
    return folder


@pytest.fixture
def host(models, tmp_path) -> UiHost:
    return UiHost(models, tmp_path / "data")


@pytest.fixture
def session(host) -> MergeSession:
    return MergeSession(host)


@pytest.fixture
def client(session) -> TestClient:
    app = FastAPI()
    app.include_router(make_router(session))
    return TestClient(app)


def search(client: TestClient, **changes):
    body = {"recipe": RECIPE, "blocks": BLOCKS, "budget": 3, "scorer": "similarity", "reference": png_base64(),
            **changes}
    return client.post(PREFIX + "/search", json=body)


def test_a_search_of_3_candidates_answers_its_result_and_swaps_in_the_best(client, session):
    response = search(client, params={"prompt": "a dog"})
    assert response.status_code == 200, response.text
    body = response.json()
    candidates = body["candidates"]
    assert [c["number"] for c in candidates] == [1, 2, 3] and not body["stopped"]
    assert body["blocks"] == BLOCKS and body["layout"] == "sd1" and body["score_log"] == SCORE_LOG
    assert body["best"] == max(candidates, key=lambda c: c["score"])
    assert Recipe.from_dict(body["best_recipe"]) == session.current.recipe  # swapped in
    assert scores_by_history_id(session.history.folder) == {c["history_id"]: c["score"] for c in candidates}
    assert {p.prompt for p in session.host.generated} == {"a dog"} and "3 of 3 candidates" in body["summary"]
    # The history (and GET /history) says which run and candidate each merge was.
    history = client.get(PREFIX + "/history", params={"limit": 10}).json()[::-1]
    assert [item["extra"]["search"].get("candidate") for item in history[:3]] == [1, 2, 3]
    assert {item["extra"]["search"]["run"] for item in history} == {body["run"]}


@pytest.mark.parametrize(("changes", "loc"), [
    ({"budget": 0}, ["body", "budget"]),
    ({"optimizer": "annealing"}, ["body", "optimizer"]),
    ({"side": "beta"}, ["body", "side"]),
    ({"bounds": [1, 0]}, ["body", "bounds"]),
    ({"blocks": ["IN04", "IN99"]}, ["body", "blocks"]),
    ({"children": 0}, ["body", "children"]),
    ({"recipe": {**RECIPE, "dice": {"mode": "R"}}}, ["body", "recipe", "dice"]),
    ({"recipe": {**RECIPE, "alpha": "x"}}, ["body", "recipe", "alpha"]),
    ({"recipe": {**RECIPE, "weights_alpha": "0.5,0.5"}}, ["body", "recipe", "weights_alpha"]),
    ({"params": {"steps": 0}}, ["body", "params", "steps"]),
    ({"scorer": "beauty"}, ["body", "scorer"]),
    ({"reference": None}, ["body", "reference"]),
    ({"reference": "not base64!"}, ["body", "reference"]),
    ({"reference": base64.b64encode(b"GIF? no").decode()}, ["body", "reference"]),
])
def test_a_bad_setting_is_422_naming_the_field_before_any_merge(client, session, changes, loc):
    response = search(client, **changes)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:len(loc)] == loc
    assert session.history.entries() == []


def test_unknown_fields_and_model_paths_are_refused(client):
    assert search(client, speed="fast").status_code == 422
    assert search(client, recipe={**RECIPE, "model_b": "../../etc/passwd"}).status_code == 403
    assert search(client, recipe={**RECIPE, "model_b": "nope.safetensors"}).status_code == 404


def test_a_search_while_a_merge_runs_is_409(client, session):
    with session._running():  # what the tab's Merge holds while it runs
        response = search(client)
    assert response.status_code == 409 and "already running" in response.json()["detail"]


class WatchedLock:
    """The host's lock, telling when someone starts waiting for it."""

    def __init__(self, lock):
        self.lock, self.wanted = lock, threading.Event()

    def __enter__(self):
        self.wanted.set()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_stop_ends_the_running_search_after_its_candidate(client, host, monkeypatch):
    assert client.post(PREFIX + "/search/stop").json() == {"stopping": False}
    lock = WatchedLock(host.lock())
    monkeypatch.setattr(host, "lock", lambda: lock)
    lock.lock.acquire()  # candidate 1's swap waits for the host's lock: the search is running meanwhile
    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(response=search(client)))
    try:
        worker.start()
        # Stop once candidate 1 is under way (polling the phase raced with the search's set-up on a busy machine).
        assert lock.wanted.wait(60), "the search never reached its first candidate's swap"
        assert client.post(PREFIX + "/search/stop").json() == {"stopping": True}
    finally:
        lock.lock.release()
        worker.join(30)
    body = answer["response"].json()
    assert answer["response"].status_code == 200 and body["stopped"] and len(body["candidates"]) == 1


def test_without_a_generator_the_search_is_501(models, tmp_path):
    app = FastAPI()
    app.include_router(make_router(MergeSession(UiHost(models, tmp_path / "data", live_from=None))))
    response = search(TestClient(app))
    assert response.status_code == 501 and "no image generator" in response.json()["detail"]


def test_the_routes_are_described(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths[PREFIX + "/search"]) == {"post"} and set(paths[PREFIX + "/search/stop"]) == {"post"}


@pytest.mark.parametrize(("message", "loc"), [
    ("Weight sum needs 0.0 ≤ alpha ≤ 1.0; the bounds 0.0..2.0 leave that range", ["body", "bounds"]),
    ("IN99: search blocks must be ids of the sd1 layout", ["body", "blocks"]),
    ("something else entirely", ["body"]),
])
def test_search_field_at_fault(message, loc):
    assert search_field_at_fault(message) == loc


def test_the_search_route_under_gradio_3_and_pydantic_1(models, tmp_path):
    out = run_under_gradio3(GRADIO3_SEARCH, models, tmp_path / "data", folder=tmp_path,
                            env={"SUPERMERGER_CACHE": str(tmp_path / "cache")})
    assert out.endswith("pydantic 1 ok")


GRADIO3_SEARCH = '''
import sys
from pathlib import Path
import pydantic
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mergers.api import PREFIX, make_router
from mergers.session import MergeSession
from tests.ui_host import UiHost
assert pydantic.VERSION.startswith("1."), pydantic.VERSION
app = FastAPI()
app.include_router(make_router(MergeSession(UiHost(Path(sys.argv[1]), Path(sys.argv[2])))))
with TestClient(app) as client:
    body = {"recipe": {"model_a": "a.safetensors", "model_b": "b.safetensors"}, "blocks": "M00", "budget": 2}
    answer = client.post(PREFIX + "/search", json=body)
    assert answer.status_code == 200 and len(answer.json()["candidates"]) == 2, answer.text
    bad = client.post(PREFIX + "/search", json={**body, "budget": 0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "budget"], bad.text
print("pydantic", pydantic.VERSION[0], "ok")
'''
