"""The HTTP API: the same routes in A1111 (``on_app_started``) and in the standalone app.

Every route lives under ``/supermerger/v1`` and drives one :class:`MergeSession`,
as the tab does. Request bodies are small pydantic models (pydantic 1 under
A1111's FastAPI 0.94, pydantic 2 under Gradio 4); the recipe inside them is a
plain JSON object that :meth:`Recipe.from_dict` validates, so the API takes what
``Recipe.to_dict()``, the history and a merged file's metadata hold.

Refusals are JSON ``{"detail": ...}``: for a field at fault, a list of one
``{"loc": [...], "msg": ..., "type": ...}`` (FastAPI's own shape for 422), else a
sentence. A model name must be one the host lists (title, file name, stem or
short hash, see ``GET /models``): a path (``../../etc/passwd``, ``/abs/x``) is
refused with 403, an unknown name with 404. A second merge while one runs gets
409 (no queue: poll ``GET /progress`` and retry).

Example:
    >>> app = FastAPI()
    >>> app.include_router(make_router(MergeSession(host)))
    >>> TestClient(app).post("/supermerger/v1/merge", json={"recipe": {"model_a": "a", "model_b": "b"}}).json()["name"]
    'a x 0.5 + b x 0.5'
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel, Field

from mergers.arch import block_ids, registry
from mergers.chain import leaf_names
from mergers.errors import (
    ArchitectureError,
    CheckpointError,
    MergeCancelled,
    MergeError,
    OutputError,
    RecipeError,
    WeightsError,
)
from mergers.hashing import cached_sha256, sha256_of_file
from mergers.host import GenerationParams
from mergers.licenses import terms_of_models
from mergers.recipe import Recipe
from mergers.search import (
    SCORE_LOG,
    SPEC_FIELDS,
    Scorer,
    SearchError,
    SearchSpec,
    builtin_scorer,
    run_search,
    search_setup,
    spec_from_dict,
)
from mergers.session import MergeBusy, MergeOutcome, MergeSession, file_stem
from mergers.weights import load_presets

log = logging.getLogger(__name__)

PREFIX = "/supermerger/v1"
TAG = "SuperMerger"
SHORTHASH_LENGTH = 10  # A1111's short hash: the first 10 hex digits of the sha256
HISTORY_LIMIT = 100  # the tab shows at most 100 rows too
RECIPE_MODEL_FIELDS = ("model_a", "model_b", "model_c", "bake_vae")
ROLES = ("model_a", "model_b", "model_c")

# Library errors → HTTP status, first match wins (subclasses before their bases).
ERROR_STATUS: tuple[tuple[type, int], ...] = (
    (MergeBusy, 409),
    (MergeCancelled, 409),
    (RecipeError, 422),
    (WeightsError, 422),
    (ArchitectureError, 422),
    (CheckpointError, 422),  # names were resolved before: this is a file that cannot be read
    (OutputError, 409),
    (MergeError, 400),
)

# What the merge routes refuse, for the OpenAPI description (the bodies are {"detail": ...}).
MERGE_REFUSALS = {
    403: {"description": "a model or output name that is a path, or leaves the model folders"},
    404: {"description": "a model that the host does not list"},
    409: {"description": "another merge is running, the merge was cancelled, or the output exists"},
    422: {"description": "bad JSON, or an invalid recipe: detail[0].loc names the field"},
}

# What a search setting's message names → its place in the body, the earliest match in the message wins.
SEARCH_FIELD_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((rf"\b{name}\b", (name,)) for name in ("side", "budget", "seed", "optimizer", "params", "bounds")),
    (r"\bblocks?\b", ("blocks",)),
    (r"\bchild(ren)?\b", ("children",)),
    (r"\bdice\b", ("recipe", "dice")),
)
MAX_IMAGE_BASE64 = 32 * 2 ** 20  # a reference image is one picture, not an upload channel

# GET /license's models, repeated (?models=a&models=b) or comma-separated, A first.
LICENSE_MODELS = Query(..., description="the models, A first, as GET /models lists them; repeated "
                                        "(?models=a&models=b) or comma-separated")

# Phrases in library messages that name a recipe field other than by its own name.
FIELD_PHRASES = {"model A": "model_a", "model B": "model_b", "model C": "model_c", "merge mode": "mode",
                 "calculation mode": "calcmode", "include/exclude": "include_exclude"}


# --- request and response bodies -------------------------------------------------------------

class _Body(BaseModel):
    """A request body that refuses unknown fields (a typo is a 422, not silently ignored)."""

    if hasattr(BaseModel, "model_config"):  # pydantic 2
        model_config = {"extra": "forbid"}
    else:  # pydantic 1 (A1111's FastAPI 0.94)
        class Config:
            extra = "forbid"


class MergeRequest(_Body):
    recipe: dict[str, Any] = Field(..., description="a Recipe as Recipe.to_dict() writes it; "
                                                    "models named as GET /models lists them")
    output: str | None = Field(None, description="file name to save under the models folder; with no "
                                                    "loaded model the merge is always saved (default: its name)")
    overwrite: bool = Field(False, description="replace an existing output file")
    allow_non_finite: bool = Field(False, description="save even when a merged key holds NaN or Inf (listed in "
                                                      "warnings); it is never swapped into the loaded model. "
                                                      "Default: refuse (400 naming the key)")


class GenerationRequest(_Body):
    """txt2img settings; a field left out takes the host's default (A1111's txt2img tab)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1, le=150)
    sampler: str | None = None
    cfg_scale: float | None = Field(None, ge=1, le=30)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    seed: int | None = None
    batch_size: int | None = Field(None, ge=1, le=8)


class MergeAndGenerateRequest(MergeRequest):
    generation: GenerationRequest = Field(default_factory=GenerationRequest)


class SearchRequest(_Body):
    """An auto-merge search (mergers.search): a base recipe, which block weights to vary, how to score."""

    recipe: dict[str, Any] = Field(..., description="the base recipe; the blocks not searched keep its weights")
    params: GenerationRequest = Field(default_factory=GenerationRequest,
                                      description="txt2img settings, one seed for every candidate "
                                                  "(-1 or none: the search's seed)")
    side: str | None = Field(None, description="alpha (default) or beta: whose block weights to search")
    blocks: list[str] | str | None = Field(None, description="block ids to vary (default: all of model A's layout)")
    bounds: list[float] | None = Field(None, description="[lower, upper] of the searched weights (default [0, 1])")
    budget: int | None = Field(None, description="candidates to merge and score (default 20)")
    seed: int | None = Field(None, description="the search's seed: the same seed replays the same candidates")
    optimizer: str | None = Field(None, description="es (default: a (1+λ) evolution strategy) or coordinate")
    children: int | None = Field(None, description="es: candidates per generation (λ, default 1)")
    scorer: str = Field("sharpness", description="sharpness, or similarity (to the reference image)")
    reference: str | None = Field(None, description="the similarity scorer's target: a PNG or JPEG, base64")
    restore: bool | None = Field(None, description="at the end, restore the checkpoint's own weights instead of "
                                                   "swapping in the best candidate (default false)")


class SearchStopResponse(BaseModel):
    stopping: bool  # whether a search was running (it ends after the current candidate)


class AnalyzeRequest(_Body):
    model_a: str
    model_b: str
    by: str = Field("block", description="how compare_models groups the keys (see mergers.analysis)")


class ModelItem(BaseModel):
    title: str
    file: str  # relative to the models folder when inside it
    shorthash: str | None = None


class PresetItem(BaseModel):
    name: str
    weights: str


class ArchitectureItem(BaseModel):
    name: str
    label: str
    layout: str
    blocks: list[str]
    lora: bool = Field(..., description="whether the LoRA tools know this architecture's module names")


class HistoryItem(BaseModel):
    id: int
    time: str
    name: str
    recipe: dict[str, Any]
    models: dict[str, dict[str, str]]
    extra: dict[str, Any] = Field(default_factory=dict)  # e.g. {"search": {"run": ..., "candidate": 3}}


class InputModel(BaseModel):
    name: str
    sha256: str | None = None  # None when not known without reading the whole file again
    shorthash: str | None = None  # from the sha256, else as the host lists it (A1111 hashes what it loads)


class Timings(BaseModel):
    merge: float
    save: float | None = None
    hash: float | None = None
    total: float


class MergeResponse(BaseModel):
    name: str
    history_id: int | None = None
    recipe: dict[str, Any]  # as run: dice drawn, seeds fixed
    architecture: str
    merged_keys: int
    swapped: bool
    saved: str | None = None  # file name under the models folder
    sha256: str | None = None  # of the saved file
    shorthash: str | None = None
    models: dict[str, InputModel]
    seconds: Timings
    warnings: list[str] = Field(default_factory=list)  # e.g. NaN keys that allow_non_finite let a save write
    # The merge's combined terms (mergers.licenses: MergeTerms.to_dict()), as GET /license gives them.
    license: dict[str, Any] | None = None


class StateResponse(BaseModel):
    """What the loaded model holds now (the web UI's indicator polls this)."""

    merged: bool  # a merge (or a LoRA applied by the tab) is swapped into the loaded model
    name: str | None = None
    history_id: int | None = None
    recipe: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    changed_keys: int = 0
    checkpoint: str | None = None  # the loaded checkpoint's file name (None: no model loaded)
    # bottom first: {"kind": "merge", "name", "history_id"} or {"kind": "checkpoint", "name"}, then the
    # layers on top, e.g. {"kind": "lora", "name": "style:0.8"} (the LoRA tab); "name" above says it in words
    stack: list[dict[str, Any]] = Field(default_factory=list)


class GenerateResponse(MergeResponse):
    images: list[str]  # PNG, base64
    infotext: str


class ProgressResponse(BaseModel):
    running: bool
    phase: str  # "idle", "merging", "saving", "hashing", "generating", "searching"
    done: int
    total: int
    key: str
    seconds: float


class CancelResponse(BaseModel):
    cancelled: bool  # whether a merge was running


class RestoreResponse(BaseModel):
    restored: int


# --- errors -------------------------------------------------------------------------------

def field_error(status: int, loc: Sequence[str], message: str, kind: str) -> HTTPException:
    """An HTTPException whose detail has FastAPI's validation shape, naming the field at fault."""
    return HTTPException(status, detail=[{"loc": list(loc), "msg": message, "type": kind}])


def http_error(error: MergeError, recipe: Mapping[str, Any] | None = None) -> HTTPException:
    """The status and detail for a library error; recipe problems name the recipe field."""
    status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
    message = str(error)
    if status == 422 and recipe is not None:
        field = field_at_fault(message, recipe)
        loc = ["body", "recipe"] + ([field] if field else [])
        return field_error(422, loc, message, type(error).__name__)
    return HTTPException(status, detail=message)


def field_at_fault(message: str, recipe: Mapping[str, Any]) -> str | None:
    """The recipe field a library message is about: the first one it names, else the one whose
    value it quotes, else the only block-weight string given when it is about weights.

    Example:
        >>> field_at_fault("alpha must be a number, not 'x'", {"alpha": "x"})
        'alpha'
    """
    names = [f.name for f in dataclasses.fields(Recipe)]
    named = [(_position(message, rf"\b{re.escape(name)}\b"), name) for name in names]
    named += [(_position(message, re.escape(phrase)), name) for phrase, name in FIELD_PHRASES.items()]
    quoted = [(_position(message, re.escape(repr(value.strip()))), name) for name, value in recipe.items()
              if name in names and isinstance(value, str) and value.strip()]
    for found in (named, quoted):
        found = [(at, name) for at, name in found if at is not None]
        if found:
            return min(found)[1]
    weights = [name for name in ("weights_alpha", "weights_beta") if recipe.get(name)]
    return weights[0] if "weights" in message and len(weights) == 1 else None


def _position(text: str, pattern: str) -> int | None:
    match = re.search(pattern, text)
    return match.start() if match else None


def parse_recipe(data: Mapping[str, Any]) -> Recipe:
    """The request's recipe, or a 422 naming the field at fault."""
    try:
        return Recipe.from_dict(dict(data))
    except WeightsError as error:  # building a Recipe parses no weights: only its Dice raises these
        raise field_error(422, ["body", "recipe", "dice"], str(error), "WeightsError") from None
    except MergeError as error:
        raise http_error(error, data) from None
    except (TypeError, ValueError) as error:  # e.g. a list where a Dice setting goes
        raise field_error(422, ["body", "recipe", field_at_fault(str(error), data) or "dice"],
                          f"invalid recipe: {error}", "RecipeError") from None


# --- names that must stay inside the model folders -----------------------------------------------

def is_path_like(name: str) -> bool:
    """Whether a model or output name is a path: absolute, home-relative or climbing out with ``..``."""
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(name.strip())
        if path.is_absolute() or path.drive or path.root or ".." in path.parts:
            return True
    return name.strip().startswith("~")


def resolve_listed(session: MergeSession, name: str, loc: Sequence[str]) -> Path:
    """A model the host lists, by name or hash; 403 for a path, 404 for an unknown name."""
    if is_path_like(name):
        raise field_error(403, loc, f"{name!r} is a path; name a model as GET {PREFIX}/models lists it "
                                    "(title, file name or short hash)", "forbidden_path")
    try:
        path = session.host.resolve(name)
    except CheckpointError as error:
        raise field_error(404, loc, str(error), "unknown_model") from None
    listed = {entry.path.resolve() for entry in session.host.list_models()}
    if path.resolve() not in listed:
        raise field_error(403, loc, f"{name!r} is not a model in the configured model folders", "forbidden_path")
    return path


def check_recipe_models(session: MergeSession, recipe: Recipe, loc: Sequence[str] = ("body", "recipe")) -> None:
    """Every model the recipe names, chained recipes followed through, resolves inside the host's
    folders (before any work)."""
    slots = [(field, getattr(recipe, field)) for field in RECIPE_MODEL_FIELDS]
    slots += [(f"more_models.{n}", model) for n, model in enumerate(recipe.more_models)]
    for field, model in slots:
        if isinstance(model, Recipe):
            check_recipe_models(session, model, [*loc, *field.split(".")])
        elif model and (field != "model_c" or model in recipe.models):
            resolve_listed(session, model, [*loc, *field.split(".")])


def check_output(session: MergeSession, name: str, overwrite: bool) -> Path:
    """The output file under the models folder; 403 if the name leaves it, 409 if it exists."""
    loc = ["body", "output"]
    if is_path_like(name) or "/" in name or "\\" in name:
        raise field_error(403, loc, f"{name!r} leaves the models folder; give a plain file name", "forbidden_path")
    try:
        target = session.output_path(name)
    except OutputError as error:
        raise field_error(422, loc, str(error), "OutputError") from None
    if target.exists() and not overwrite:
        raise field_error(409, loc, f"{target.name} exists in the models folder; set overwrite to replace it",
                          "output_exists")
    return target


def default_output(outcome: MergeOutcome) -> str:
    """The merge's name as a file name, as the tab's Save makes it (spaces dropped); a dot left
    at the cut would make ``..`` with the extension, which output names may not hold."""
    return file_stem(outcome.name)


# --- progress and the one-merge-at-a-time slot -----------------------------------------------

class MergeSlot:
    """One API merge at a time, and the last progress it reported (read by GET /progress)."""

    def __init__(self):
        self._slot = threading.Lock()
        self._state = threading.Lock()
        self._phase, self._done, self._total, self._key, self._started = "idle", 0, 0, "", 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the slot for one request; 409 when another holds it."""
        if not self._slot.acquire(blocking=False):
            raise HTTPException(409, detail=f"a merge is already running; see GET {PREFIX}/progress, "
                                            f"or stop it with POST {PREFIX}/cancel")
        self._started = time.perf_counter()
        try:
            yield
        finally:
            self.phase("idle")
            self._slot.release()

    def phase(self, name: str) -> None:
        with self._state:
            self._phase, self._done, self._total, self._key = name, 0, 0, ""

    def progress(self, done: int, total: int, key: str) -> None:
        """The engine's ``on_progress`` callback."""
        with self._state:
            self._done, self._total, self._key = done, total, key

    def snapshot(self) -> dict:
        with self._state:
            running = self._phase != "idle"
            return {"running": running, "phase": self._phase, "done": self._done, "total": self._total,
                    "key": self._key, "seconds": time.perf_counter() - self._started if running else 0.0}


# --- the routes ----------------------------------------------------------------------------------

def make_router(session: MergeSession, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    """The API's routes around ``session``; ``dependencies`` guard every route (e.g. :func:`basic_auth`).

    Example:
        >>> app.include_router(make_router(session, dependencies=basic_auth("user:secret")))
    """
    router = APIRouter(prefix=PREFIX, tags=[TAG], dependencies=list(dependencies))
    slot = MergeSlot()
    _add_lists(router, session)
    _add_merging(router, session, slot)
    _add_control(router, session, slot)
    _add_search(router, session, slot)
    return router


def make_state_router(session: MergeSession, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    """Only ``GET /state`` and ``POST /restore``: what the web UI's indicator (``javascript/``) needs, for
    an A1111 that serves no API (no ``--api``); :func:`make_router` includes both.

    Example:
        >>> app.include_router(make_state_router(session))
    """
    router = APIRouter(prefix=PREFIX, tags=[TAG], dependencies=list(dependencies))
    _add_state(router, session)
    _add_restore(router, session)
    return router


def webui_routers(session: MergeSession, *, api: bool, api_auth: str | None = None,
                  gradio_auth: str | None = None) -> list[APIRouter]:
    """What the web UI's app serves: every route when it serves an API (``--api``/``--nowebui``), behind
    ``--api-auth``; else only the indicator's (:func:`make_state_router`), unless the page is behind
    ``--gradio-auth`` with no ``--api-auth`` to guard them (the indicator then stays hidden).

    Example:
        >>> webui_routers(session, api=False)[0].routes[0].path
        '/supermerger/v1/state'
    """
    dependencies = basic_auth(api_auth)
    if api:
        return [make_router(session, dependencies=dependencies)]
    if gradio_auth and not api_auth:
        return []
    return [make_state_router(session, dependencies=dependencies)]


def _add_state(router: APIRouter, session: MergeSession) -> None:
    @router.get("/state", response_model=StateResponse,
                summary="What is swapped into the loaded model now: the merge (name, ID, recipe, warnings) or none")
    def state():
        return session.state()


def _add_restore(router: APIRouter, session: MergeSession) -> None:
    @router.post("/restore", response_model=RestoreResponse,
                 summary="Put the loaded model's original weights back")
    def restore():
        try:
            return {"restored": session.restore()}
        except MergeError as error:
            raise http_error(error) from None


def _add_lists(router: APIRouter, session: MergeSession) -> None:
    @router.get("/models", response_model=list[ModelItem], summary="The checkpoints a recipe may name")
    def models():
        return [_model_item(session, entry) for entry in session.host.list_models()]

    @router.get("/presets", response_model=list[PresetItem], summary="Block-weight presets (shipped and the user's)")
    def presets():
        return [{"name": name, "weights": weights} for name, weights in load_presets().items()]

    @router.get("/architectures", response_model=list[ArchitectureItem],
                summary="Recognised architectures and their blocks (shipped and the user's layout files)")
    def architectures():
        return [{"name": spec.name, "label": spec.label, "layout": spec.layout, "lora": spec.lora,
                 "blocks": list(block_ids(spec.layout))} for spec in registry().architectures.values()]

    @router.get("/history", response_model=list[HistoryItem], summary="Past merges, newest first")
    def history(search: str = "", match: str = "and", limit: int = 20):
        if match not in ("and", "or"):
            raise field_error(422, ["query", "match"], f"match must be 'and' or 'or', not {match!r}", "value_error")
        limit = max(1, min(limit, HISTORY_LIMIT))
        entries = session.history.search(search, match_all=match == "and", limit=limit)
        return [entry.to_dict() for entry in entries]

    @router.get("/license", response_model=dict[str, Any],
                summary="What a merge of these models may be used for: each input's terms and the combined terms "
                        "(an aid, not legal advice)", responses=MERGE_REFUSALS)
    def license_terms(models: list[str] = LICENSE_MODELS):
        names = [name.strip() for given in models for name in given.split(",") if name.strip()]
        for index, name in enumerate(names):
            resolve_listed(session, name, ["query", "models", str(index)])
        try:
            return terms_of_models(names, session.host.resolve).to_dict()
        except MergeError as error:
            raise http_error(error) from None

    @router.post("/analyze", response_model=dict[str, Any], summary="Compare two models (mergers.analysis)")
    def analyze(request: AnalyzeRequest):
        from mergers.analysis import BY, compare_models  # written beside this module; imported when asked

        if request.by not in BY:
            raise field_error(422, ["body", "by"], f"by must be one of {', '.join(BY)}, not {request.by!r}",
                              "value_error")
        path_a = resolve_listed(session, request.model_a, ["body", "model_a"])
        path_b = resolve_listed(session, request.model_b, ["body", "model_b"])
        try:
            result = compare_models(path_a, path_b, by=request.by).to_dict()
        except MergeError as error:
            raise http_error(error) from None
        # The names as asked, not the server's paths; NaN (a zero tensor's cosine) is not JSON: null.
        return json_safe({**result, "model_a": request.model_a, "model_b": request.model_b})


def _add_merging(router: APIRouter, session: MergeSession, slot: MergeSlot) -> None:
    @router.post("/merge", response_model=MergeResponse, summary="Merge a recipe (swapped in, or saved)",
                 responses=MERGE_REFUSALS)
    def merge(request: MergeRequest):
        return _merge(session, slot, request)

    @router.post("/merge-and-generate", response_model=GenerateResponse,
                 summary="Merge a recipe into the loaded model, then txt2img with it",
                 responses={**MERGE_REFUSALS, 501: {"description": "the host has no image generator"}})
    def merge_and_generate(request: MergeAndGenerateRequest):
        if not session.host.can_generate():
            raise HTTPException(501, detail="this host has no image generator (the standalone app): "
                                            f"use POST {PREFIX}/merge, or the web UI")
        params = generation_params(session.host.default_generation(), request.generation)
        return _merge(session, slot, request, params=params)


def _add_control(router: APIRouter, session: MergeSession, slot: MergeSlot) -> None:
    @router.get("/progress", response_model=ProgressResponse, summary="The running merge's progress")
    def progress():
        return slot.snapshot()

    @router.post("/cancel", response_model=CancelResponse, summary="Stop the running merge (it undoes itself)")
    def cancel():
        running = slot.snapshot()["running"]
        session.stop()
        return {"cancelled": running}

    _add_state(router, session)
    _add_restore(router, session)


def _add_search(router: APIRouter, session: MergeSession, slot: MergeSlot) -> None:
    stop = threading.Event()

    @router.post("/search", response_model=dict[str, Any],
                 summary="Auto-merge: search block weights whose images score best; the best is swapped in",
                 responses={**MERGE_REFUSALS, 400: {"description": "the search failed midway (the detail names "
                                                                   "the candidate; the scores made are logged)"},
                            501: {"description": "the host has no image generator"}})
    def search(request: SearchRequest):
        if not session.host.can_generate():
            raise HTTPException(501, detail="a search generates images, and this host has no image generator "
                                            "(the standalone app): run it in the web UI")
        spec, scorer = _search_spec(session, request)
        with slot.running():
            stop.clear()
            slot.phase("searching")
            try:
                result = run_search(session, spec, scorer, stop=stop.is_set, on_progress=slot.progress)
            except SearchError as error:
                raise search_http_error(error) from None
            except MergeError as error:
                raise http_error(error) from None
        return json_safe({**result.to_dict(), "score_log": SCORE_LOG})  # the log's name, not the server's path

    @router.post("/search/stop", response_model=SearchStopResponse,
                 summary="End the running search after its current candidate (the best so far is swapped in)")
    def stop_search():
        running = slot.snapshot()["phase"] == "searching"
        if running:
            stop.set()
        return {"stopping": running}


def _search_spec(session: MergeSession, request: SearchRequest) -> tuple[SearchSpec, Scorer]:
    """The request's search and scorer, every setting checked before any merge; 422 names the field."""
    recipe = parse_recipe(request.recipe)
    check_recipe_models(session, recipe)
    given = request.model_dump() if hasattr(request, "model_dump") else request.dict()
    body = {name: value for name, value in given.items() if name in SPEC_FIELDS and value is not None}
    body["params"] = {name: value for name, value in given["params"].items() if value is not None}
    try:
        spec = spec_from_dict(body, session.host.default_generation())
        search_setup(spec, session.host.resolve)  # the blocks and the optimizer's settings, against model A
    except WeightsError as error:  # the base recipe's weights of the searched side, read in model A's layout
        raise field_error(422, ["body", "recipe", f"weights_{body.get('side') or 'alpha'}"], str(error),
                          "WeightsError") from None
    except RecipeError as error:
        raise field_error(422, search_field_at_fault(str(error)), str(error), "RecipeError") from None
    except MergeError as error:  # model A's file cannot be read, or its architecture is unknown
        raise http_error(error, request.recipe) from None
    reference = decode_image(request.reference, ["body", "reference"]) if request.reference else None
    try:
        scorer = builtin_scorer(request.scorer, reference=reference)
    except MergeError as error:
        loc = ["body", "reference" if request.scorer == "similarity" else "scorer"]
        raise field_error(422, loc, str(error), type(error).__name__) from None
    return spec, scorer


def search_field_at_fault(message: str) -> list[str]:
    """Where a search setting's message points: the first search field (or phrase) it names, else the body.

    Example:
        >>> search_field_at_fault("budget must be a whole number of candidates from 1 to 1000; got 0")
        ['body', 'budget']
    """
    found = [(_position(message, pattern), loc) for pattern, loc in SEARCH_FIELD_PATTERNS]
    found = [(at, loc) for at, loc in found if at is not None]
    return ["body", *min(found)[1]] if found else ["body"]


def search_http_error(error: SearchError) -> HTTPException:
    """A search that failed midway: the status of what failed (409 busy or cancelled, 400 a scorer)
    with the search's message, which names the candidate."""
    cause = error.__cause__ if isinstance(error.__cause__, MergeError) else error
    status = next(code for kind, code in ERROR_STATUS if isinstance(cause, kind))
    return HTTPException(status, detail=str(error))


def decode_image(text: str, loc: Sequence[str]) -> Image.Image:
    """A base64 image (a ``data:`` URL prefix allowed) as an RGB PIL image; 422 naming ``loc`` if it is not one."""
    if len(text) > MAX_IMAGE_BASE64:
        raise field_error(422, loc, f"the image is over {MAX_IMAGE_BASE64 // 2 ** 20} MiB of base64", "value_error")
    data = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            return image.convert("RGB")
    except (ValueError, OSError, Image.DecompressionBombError) as error:  # binascii.Error is a ValueError
        raise field_error(422, loc, f"not a base64 PNG or JPEG image: {error}", "value_error") from None


def _merge(session: MergeSession, slot: MergeSlot, request: MergeRequest, *,
           params: GenerationParams | None = None) -> dict:
    """Validate everything, then merge (and save, and generate) under the slot."""
    recipe = parse_recipe(request.recipe)
    check_recipe_models(session, recipe)
    target = check_output(session, request.output, request.overwrite) if request.output else None
    started = time.perf_counter()
    with slot.running():
        try:
            slot.phase("merging")
            # Recorded after the save, so the history line holds the save's warnings too.
            outcome = session.merge(recipe, on_progress=slot.progress, allow_non_finite=request.allow_non_finite,
                                    record=False)
            saved = None
            try:
                saved = _save(session, slot, outcome, target, request.overwrite, request.allow_non_finite)
            finally:
                outcome = session.record_history(warnings=saved["warnings"] if saved else ())
            generated = _generate(session, slot, params) if params is not None and not outcome.refused else None
        except MergeError as error:
            raise http_error(error, request.recipe) from None
    response = _merge_response(session, outcome, saved, time.perf_counter() - started)
    if params is not None:  # a merge refused for NaN/Inf is not generated with: its warnings say why
        response.update(images=[_png_base64(image) for image in generated.images] if generated else [],
                        infotext=generated.infotext if generated else "")
    return response


def _save(session: MergeSession, slot: MergeSlot, outcome: MergeOutcome, target: Path | None,
          overwrite: bool, allow_non_finite: bool = False) -> dict | None:
    """Save when asked, and always when nothing was swapped in (else the merge would be lost)."""
    if target is None and outcome.swapped:
        return None
    if target is None:
        target = check_output(session, default_output(outcome), overwrite)
    recipe = outcome.recipe
    slot.phase("saving")
    started = time.perf_counter()
    path = session.save(target.name, dtype=recipe.dtype, prune=recipe.prune, bake_vae=recipe.bake_vae,
                        overwrite=overwrite, on_progress=slot.progress, allow_non_finite=allow_non_finite)
    saved_at = time.perf_counter()
    slot.phase("hashing")
    sha256 = sha256_of_file(path)  # one read of the new file; cached for the next use
    return {"path": path, "sha256": sha256, "save": saved_at - started, "hash": time.perf_counter() - saved_at,
            "warnings": session.save_warnings}


def _generate(session: MergeSession, slot: MergeSlot, params: GenerationParams):
    slot.phase("generating")
    return session.generate(params)


def _merge_response(session: MergeSession, outcome: MergeOutcome, saved: dict | None, total: float) -> dict:
    saved = saved or {}
    path: Path | None = saved.get("path")
    return {
        "name": outcome.name, "history_id": outcome.history_id, "recipe": outcome.recipe.to_dict(),
        "architecture": outcome.architecture, "merged_keys": outcome.merged_keys, "swapped": outcome.swapped,
        "saved": path.name if path else None, "sha256": saved.get("sha256"),
        "shorthash": saved["sha256"][:SHORTHASH_LENGTH] if path else None,
        "models": _input_hashes(session, outcome.recipe),
        "seconds": {"merge": outcome.seconds, "save": saved.get("save"), "hash": saved.get("hash"), "total": total},
        "warnings": list(outcome.warnings),
        "license": _license_of(session, outcome.recipe),
    }


def _license_of(session: MergeSession, recipe: Recipe) -> dict | None:
    """The merge's combined terms; None (and a log line) if the inputs cannot be read again."""
    try:
        return terms_of_models(list(recipe.models), session.host.resolve).to_dict()
    except MergeError as error:
        log.warning("the merge's license could not be read: %s", error)
        return None


def _input_hashes(session: MergeSession, recipe: Recipe) -> dict:
    """Each input's hashes where known without reading the file again (the merge, or the host, hashed it)."""
    listed = {entry.path.resolve(): entry.shorthash for entry in session.host.list_models()}
    hashes = {}
    for index, name in enumerate(leaf_names(recipe)):  # chained recipes followed through, A first
        path = session.host.resolve(name).resolve()
        sha256 = cached_sha256(path)
        role = ROLES[index] if index < len(ROLES) else f"model_{index + 1}"
        hashes[role] = {"name": name, "sha256": sha256,
                        "shorthash": sha256[:SHORTHASH_LENGTH] if sha256 else listed.get(path)}
    return hashes


def _model_item(session: MergeSession, entry) -> dict:
    try:
        file = entry.path.resolve().relative_to(session.host.models_dir.resolve()).as_posix()
    except ValueError:  # another configured folder (A1111's --ckpt-dir): its name only
        file = entry.path.name
    return {"title": entry.title, "file": file, "shorthash": entry.shorthash}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as None, which JSON can carry.

    Example:
        >>> json_safe({"cosine": float("nan"), "rows": [1.5]})
        {'cosine': None, 'rows': [1.5]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def generation_params(defaults: GenerationParams, request: GenerationRequest) -> GenerationParams:
    """The host's txt2img defaults with the fields the request gives.

    Example:
        >>> generation_params(GenerationParams(), GenerationRequest(steps=8)).steps
        8
    """
    given = request.model_dump() if hasattr(request, "model_dump") else request.dict()
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- A1111's --api-auth ----------------------------------------------------------------------

def basic_auth(api_auth: str | None) -> list:
    """Route dependencies that check HTTP Basic credentials as A1111's API does with ``--api-auth``.

    ``api_auth`` is A1111's ``"user:password"`` or ``"u1:p1,u2:p2"``; None or empty
    means no check (A1111 then leaves its own API open too).

    Example:
        >>> make_router(session, dependencies=basic_auth(shared.cmd_opts.api_auth))
    """
    if not api_auth:
        return []
    credentials = parse_api_auth(api_auth)

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 - FastAPI's idiom
        expected = credentials.get(given.username)
        if expected is not None and secrets.compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def parse_api_auth(text: str) -> dict[str, str]:
    """``"u1:p1,u2:p2"`` → ``{"u1": "p1", "u2": "p2"}``, as A1111 reads ``--api-auth``."""
    credentials = {}
    for entry in text.split(","):
        user, colon, password = entry.partition(":")
        if not colon or not user:
            raise MergeError(f"--api-auth entry {entry!r} is not user:password")
        credentials[user] = password
    return credentials
