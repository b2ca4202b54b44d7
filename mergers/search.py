"""Auto-merge search: look for the block weights whose images score best.

The host (or the caller) supplies a :data:`Scorer` that rates the images a
merge generates; :func:`run_search` asks a seeded optimizer for block weights,
streams each candidate merge into the loaded model (``only_changed``: only the
keys whose ratio changed are re-merged), generates with one fixed seed, scores
the images, and at the end swaps in the best candidate. Every candidate is a
merge in the history, its entry's ``extra`` naming the run and the candidate
(``{"search": {"run": ..., "candidate": 3}}``); its score goes to
``search_scores.jsonl`` beside the history file, keyed by history ID (history
lines are written before the images exist, and the history is append-only).

The optimizers are pure: ``ask()`` a point, ``tell(point, score)`` its score,
no I/O, the same points for the same seed and scores, so they are tested on a
synthetic objective without merging anything.

Example:
    >>> spec = SearchSpec(Recipe(model_a="a.safetensors", model_b="b.safetensors"),
    ...                   GenerationParams(prompt="a cat", seed=7), blocks=("IN00", "M00", "OUT11"), budget=12)
    >>> result = run_search(session, spec, similarity_to(reference_image))
    >>> result.best.score, result.best.weights
    (0.93, '0.5,0.25,...')
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mergers.arch import detect_architecture
from mergers.arch.layouts import block_ids
from mergers.checkpoint import open_checkpoint
from mergers.engine import ProgressCallback
from mergers.errors import MergeError, RecipeError
from mergers.host import GenerationParams
from mergers.recipe import Recipe
from mergers.session import MergeSession, warnings_text
from mergers.weights import BlockWeights, parse_weights

Scorer = Callable[[list[Image.Image], GenerationParams], float]  # higher is better
CandidateCallback = Callable[["Candidate", float, list[Image.Image]], None]  # for the UI's progress
Point = tuple[float, ...]  # one value per searched block, in the spec's block order

SIDES = ("alpha", "beta")
DECIMALS = 3  # weights are rounded so history names and weight strings stay readable
MAX_BUDGET = 1000  # a typo in the API's budget should not mean a week of merging
SCORE_LOG = "search_scores.jsonl"
ID_ALIASES = {"MID": "M00"}


class SearchError(MergeError):
    """A search that ended on an error; ``result`` holds the candidates scored before it."""

    def __init__(self, message: str, result: SearchResult):
        super().__init__(message)
        self.result = result


# --- built-in scorers ---------------------------------------------------------------


def sharpness(images: list[Image.Image], params: GenerationParams) -> float:
    """Mean, over the images, of the variance of the grey image's Laplacian (crisp detail scores high).

    Example:
        >>> sharpness([Image.new("L", (8, 8))], GenerationParams())
        0.0
    """
    return float(np.mean([_laplacian_variance(image) for image in images])) if images else 0.0


def _laplacian_variance(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    if min(grey.shape) < 3:
        return 0.0
    laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]) - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def similarity_to(reference: Image.Image) -> Scorer:
    """A scorer: 1 − mean absolute RGB difference / 255 from ``reference`` (1 = the same picture).

    Each image is resized to the reference's size first; several images score their mean.

    Example:
        >>> similarity_to(Image.new("RGB", (4, 4)))([Image.new("RGB", (8, 8), (255, 255, 255))], GenerationParams())
        0.0
    """
    target = np.asarray(reference.convert("RGB"), dtype=np.float64)

    def score(images: list[Image.Image], params: GenerationParams) -> float:
        if not images:
            return 0.0
        distances = [np.abs(np.asarray(image.convert("RGB").resize(reference.size), dtype=np.float64) - target).mean()
                     for image in images]
        return 1.0 - float(np.mean(distances)) / 255.0

    return score


def builtin_scorer(name: str, *, reference: Image.Image | None = None) -> Scorer:
    """A built-in scorer by name, for the API and demos: "sharpness", or "similarity" (needs ``reference``).

    Example:
        >>> builtin_scorer("similarity", reference=Image.open("target.png"))
    """
    if name == "sharpness":
        return sharpness
    if name == "similarity":
        if reference is None:
            raise MergeError("the similarity scorer needs a reference image")
        return similarity_to(reference)
    raise MergeError(f"unknown scorer {name!r}; built in: sharpness, similarity")


# --- optimizers: pure ask/tell, deterministic for a seed --------------------------------


class Optimizer(Protocol):
    def ask(self) -> Point:
        """The next point to score (call ``tell`` with its score before asking again)."""

    def tell(self, point: Point, score: float) -> None: ...


def _clip_round(values: Sequence[float], lower: float, upper: float) -> Point:
    return tuple(round(min(max(v, lower), upper), DECIMALS) for v in values)


class _AskTell:
    """The bookkeeping both optimizers share: one outstanding point, the best one seen."""

    def __init__(self, start: Sequence[float], lower: float, upper: float):
        if not upper - lower >= 10 ** -DECIMALS:  # a narrower range has one rounded value: nothing to search
            raise RecipeError(f"search bounds must have lower < upper, {10 ** -DECIMALS} apart at least; "
                              f"got {lower}..{upper}")
        self.lower, self.upper = lower, upper
        self.start = _clip_round(start, lower, upper)
        self.best: Point | None = None
        self.best_score = -math.inf
        self._asked: Point | None = None

    def ask(self) -> Point:
        if self._asked is not None:
            raise RecipeError(f"tell the score of {self._asked} before asking for another point")
        self._asked = self.start if self.best is None else self._propose()
        return self._asked

    def tell(self, point: Point, score: float) -> None:
        if point != self._asked:
            raise RecipeError(f"told the score of {point}, but the point asked was {self._asked}")
        self._asked = None
        if self.best is None:
            self.best, self.best_score = point, score
            return
        self._learn(point, score)

    def _propose(self) -> Point:
        raise NotImplementedError

    def _learn(self, point: Point, score: float) -> None:
        raise NotImplementedError


class EvolutionStrategy(_AskTell):
    """A (1+λ) evolution strategy with the 1/5th success rule.

    The first point is the start. Each generation then draws λ children of the
    parent (the best point so far), adding N(0, σ²) to every coordinate, clipped
    to the bounds and rounded. After λ children the best one replaces the parent
    if it scores at least as well (so plateaus are crossed). σ grows by e^(1/3)
    for each child that beat the parent and shrinks by e^(-1/12) for each that
    did not: it stays put when one child in five succeeds. σ starts at
    ``step`` × (upper − lower) and stays within [10^-DECIMALS, 1] × that span.

    Example:
        >>> es = EvolutionStrategy((0.5, 0.5), 0.0, 1.0, seed=1)
        >>> point = es.ask(); es.tell(point, -sum((x - 0.2) ** 2 for x in point))
    """

    def __init__(self, start: Sequence[float], lower: float, upper: float, *, seed: int,
                 children: int = 1, step: float = 0.2):
        super().__init__(start, lower, upper)
        if children < 1:
            raise RecipeError(f"an evolution strategy needs at least 1 child per generation; got {children}")
        self.children = children
        self.span = upper - lower
        self.sigma = step * self.span
        self._rng = random.Random(seed)
        self._generation: list[tuple[float, Point]] = []

    def _propose(self) -> Point:
        return _clip_round([x + self._rng.gauss(0.0, self.sigma) for x in self.best], self.lower, self.upper)

    def _learn(self, point: Point, score: float) -> None:
        self._generation.append((score, point))
        if len(self._generation) < self.children:
            return
        successes = sum(child_score > self.best_score for child_score, _ in self._generation)
        best_score, best = max(self._generation, key=lambda scored: scored[0])  # the first on ties
        if best_score >= self.best_score:
            self.best, self.best_score = best, best_score
        factor = math.exp(successes / 3 - (self.children - successes) / 12)
        self.sigma = min(max(self.sigma * factor, 10 ** -DECIMALS * self.span), self.span)
        self._generation = []


class CoordinateSearch(_AskTell):
    """Compass search: from the best point, try +step, then −step, along one coordinate at a time.

    A move that scores better is kept (and the −step of that coordinate skipped).
    The coordinates are visited in an order the seed shuffles anew each sweep;
    after a sweep with no improvement the step halves (down to 10^-DECIMALS).
    The step starts at ``step`` × (upper − lower).

    Example:
        >>> search = CoordinateSearch((0.5, 0.5), 0.0, 1.0, seed=1)
    """

    def __init__(self, start: Sequence[float], lower: float, upper: float, *, seed: int, step: float = 0.25):
        super().__init__(start, lower, upper)
        self.step = max(step * (upper - lower), 10 ** -DECIMALS)  # a smaller move rounds to no move
        self._rng = random.Random(seed)
        self._moves: list[tuple[int, int]] = []  # (coordinate, ±1) still to try this sweep
        self._sweeps = 0
        self._improved = False

    def _propose(self) -> Point:
        while True:
            if not self._moves:
                self._new_sweep()
            coordinate, sign = self._moves.pop(0)
            moved = list(self.best)
            moved[coordinate] += sign * self.step
            point = _clip_round(moved, self.lower, self.upper)
            if point != self.best:  # a move past a bound that changes nothing is skipped
                return point

    def _new_sweep(self) -> None:
        if self._sweeps and not self._improved:
            self.step = max(self.step / 2, 10 ** -DECIMALS)
        self._sweeps += 1
        self._improved = False
        order = list(range(len(self.best)))
        self._rng.shuffle(order)
        self._moves = [(coordinate, sign) for coordinate in order for sign in (1, -1)]

    def _learn(self, point: Point, score: float) -> None:
        if score > self.best_score:
            changed = next(i for i, (a, b) in enumerate(zip(point, self.best)) if a != b)
            self.best, self.best_score, self._improved = point, score, True
            self._moves = [move for move in self._moves if move[0] != changed]


OPTIMIZERS = {
    "es": lambda start, spec: EvolutionStrategy(start, *spec.bounds, seed=spec.seed, children=spec.children),
    "coordinate": lambda start, spec: CoordinateSearch(start, *spec.bounds, seed=spec.seed),
}


# --- what to search ------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpec:
    """A search: the base recipe, which side's block weights to vary, and how long to look.

    ``blocks``: ids of the layout to vary (None: all of model A's layout); the
    others keep the base recipe's weights (its weight string, else its scalar).
    ``params.seed`` -1 means the search's own ``seed``, so a run replays exactly.
    ``children``: λ of the "es" optimizer (children per generation).
    """

    recipe: Recipe
    params: GenerationParams
    side: str = "alpha"
    blocks: tuple[str, ...] | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    budget: int = 20
    seed: int = 1
    optimizer: str = "es"
    children: int = 1
    layout: str | None = None  # None: read from model A's file
    restore: bool = False  # at the end, put the checkpoint's own weights back instead of swapping in the best

    def __post_init__(self):
        if self.side not in SIDES:
            raise RecipeError(f"side must be one of {', '.join(SIDES)}; got {self.side!r}")
        if self.side not in self.recipe.method.params:
            raise RecipeError(f"{self.recipe.method.label} does not use {self.side}; search the other side")
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or not 1 <= self.budget <= MAX_BUDGET:
            raise RecipeError(f"budget must be a whole number of candidates from 1 to {MAX_BUDGET}; "
                              f"got {self.budget!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"seed must be a whole number; got {self.seed!r}")
        if self.recipe.dice.mode != "off":
            raise RecipeError("the dice would replace the searched weights; set the dice off to search")
        lower, upper = _bounds(self.bounds)
        for param, low, high in self.recipe.method.bounds:
            if param == self.side and not low <= lower < upper <= high:
                raise RecipeError(f"{self.recipe.method.label} needs {low} ≤ {param} ≤ {high}; "
                                  f"the bounds {lower}..{upper} leave that range")
        object.__setattr__(self, "bounds", (lower, upper))
        if isinstance(self.blocks, str):  # "IN00 IN01, OUT05" as typed in a textbox
            object.__setattr__(self, "blocks", tuple(re.split(r"[\s,]+", self.blocks.strip())))
        elif self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))


def _bounds(bounds: object) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise RecipeError(f"bounds must be two numbers, lower and upper; got {bounds!r}") from None
    if not (math.isfinite(lower) and math.isfinite(upper) and upper - lower >= 10 ** -DECIMALS):
        raise RecipeError(f"bounds must be finite with lower < upper ({10 ** -DECIMALS} apart at least); "
                          f"got {bounds!r}")
    return lower, upper


@dataclass(frozen=True)
class SearchSpace:
    """The searched blocks of one layout, the base weights the others keep, and the recipe they go into."""

    layout: str
    side: str
    blocks: tuple[str, ...]
    base: tuple[float, ...]  # every block of the layout
    recipe: Recipe  # the spec's, its random seed fixed, so candidates differ only in weights

    def start(self) -> Point:
        ids = block_ids(self.layout)
        return tuple(self.base[ids.index(block)] for block in self.blocks)

    def weights(self, point: Point) -> BlockWeights:
        values = list(self.base)
        ids = block_ids(self.layout)
        for block, value in zip(self.blocks, point, strict=True):
            values[ids.index(block)] = value
        return BlockWeights(self.layout, tuple(values))

    def recipe_for(self, point: Point) -> Recipe:
        return self.recipe.with_changes(**{f"weights_{self.side}": self.weights(point).as_text()})


def search_space(spec: SearchSpec, layout: str) -> SearchSpace:
    """The blocks ``spec`` varies in ``layout`` (checked), with the base recipe's weights.

    Example:
        >>> search_space(SearchSpec(recipe, params, blocks=("in00", "MID")), "sd1").blocks
        ('IN00', 'M00')
    """
    ids = block_ids(layout)
    blocks = ids if spec.blocks is None else tuple(_block_id(block) for block in spec.blocks)
    unknown = [block for block in blocks if block not in ids]
    if unknown or not blocks:
        raise RecipeError(f"{', '.join(unknown) or 'no block'}: search blocks must be ids of the {layout} layout "
                          f"({ids[0]}, {ids[1]} … {ids[-1]})")
    if len(set(blocks)) != len(blocks):
        raise RecipeError(f"search blocks name a block twice: {', '.join(blocks)}")
    text = getattr(spec.recipe, f"weights_{spec.side}")
    base = parse_weights(text, layout).values if text else (getattr(spec.recipe, spec.side),) * len(ids)
    recipe = spec.recipe.with_changes(seed=spec.seed) if spec.recipe.seed == -1 else spec.recipe
    return SearchSpace(layout, spec.side, blocks, tuple(base), recipe)


def _block_id(text: str) -> str:
    word = text.strip().upper()
    return ID_ALIASES.get(word, word)


def search_setup(spec: SearchSpec, resolve: Callable[[str], Path]) -> tuple[SearchSpace, Optimizer]:
    """The space ``spec`` searches (model A's layout read unless ``spec.layout`` names one) and a fresh
    optimizer at its start: every setting is checked here, so the tab and the API refuse a bad block or
    optimizer setting before the first merge.

    Example:
        >>> space, optimizer = search_setup(spec, host.resolve)
        >>> space.layout, space.blocks[:2]
        ('sd1', ('BASE', 'IN00'))
    """
    space = search_space(spec, spec.layout or layout_of(spec.recipe, resolve))
    return space, OPTIMIZERS[spec.optimizer](space.start(), spec)


def layout_of(recipe: Recipe, resolve: Callable[[str], Path]) -> str:
    """The block layout of model A (of the innermost model A when A is a chained recipe)."""
    model = recipe.model_a
    while isinstance(model, Recipe):
        model = model.model_a
    with open_checkpoint(resolve(model)) as checkpoint:
        return detect_architecture(checkpoint.shapes, checkpoint.metadata, source=checkpoint.name).layout


# --- running it ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One scored merge: its number (from 1), searched values, the side's weight string, the recipe as run."""

    number: int
    values: Point
    weights: str
    recipe: Recipe
    score: float
    history_id: int | None
    rewritten: int | None  # keys re-merged by a partial merge; None for a full one

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "values": list(self.values), "weights": self.weights, "score": self.score,
                "history_id": self.history_id, "rewritten": self.rewritten}


@dataclass
class SearchResult:
    """What a search made: every candidate in order, and the merge it ended with."""

    spec: SearchSpec
    layout: str
    blocks: tuple[str, ...]
    params: GenerationParams  # as generated: the seed fixed
    candidates: list[Candidate] = field(default_factory=list)
    stopped: bool = False
    final_history_id: int | None = None  # the best candidate, merged again at the end (None: it was loaded)
    restored: bool = False  # spec.restore: the checkpoint's own weights were put back at the end
    warnings: list[str] = field(default_factory=list)  # the candidates' merge warnings, in order
    seconds: float = 0.0
    log_path: Path | None = None
    run: str = ""  # the run's ID in the score log and in its merges' history entries ("extra")

    @property
    def best(self) -> Candidate | None:
        """The highest score (the earliest of equal ones)."""
        return max(self.candidates, key=lambda c: c.score, default=None)

    @property
    def summary(self) -> str:
        best = self.best
        found = f", best #{best.number} scores {best.score:.4g}" if best else ""
        ending = " — stopped" if self.stopped else ""
        ending += "; the model was restored to its checkpoint" if self.restored else ""
        return (f"Search ({self.spec.optimizer}, seed {self.spec.seed}): {len(self.candidates)} of "
                f"{self.spec.budget} candidates{found} in {self.seconds:.1f} s{ending}") + warnings_text(self.warnings)

    def to_dict(self) -> dict[str, Any]:
        """The API's answer."""
        best = self.best
        return {"summary": self.summary, "run": self.run, "layout": self.layout, "side": self.spec.side,
                "blocks": list(self.blocks),
                "seed": self.params.seed, "stopped": self.stopped,
                "best": best.to_dict() if best else None,
                "best_recipe": best.recipe.to_dict() if best else None,
                "final_history_id": self.final_history_id, "restored": self.restored, "warnings": self.warnings,
                "candidates": [c.to_dict() for c in self.candidates],
                "score_log": str(self.log_path) if self.log_path else None}


def run_search(session: MergeSession, spec: SearchSpec, scorer: Scorer, *,
               on_candidate: CandidateCallback | None = None, stop: Callable[[], bool] | None = None,
               on_progress: ProgressCallback | None = None) -> SearchResult:
    """Merge, generate and score ``spec.budget`` candidates, then swap in the best one.

    ``stop()`` is asked before each candidate: True ends the search there (the
    best so far is still swapped in). A failed merge, generation or score raises
    :class:`SearchError` naming the candidate; the session has already put the
    loaded model back for a failed merge, so Restore works as after any merge.

    Example:
        >>> run_search(session, spec, sharpness, stop=stop_event.is_set).summary
        'Search (es, seed 1): 20 of 20 candidates, best #14 scores 812.3 in 31.0 s'
    """
    if not session.host.can_generate():
        raise MergeError("a search needs an image generator; this host has none (run it in the web UI)")
    space, optimizer = search_setup(spec, session.host.resolve)
    params = spec.params if spec.params.seed != -1 else dataclasses.replace(spec.params, seed=spec.seed)
    log = ScoreLog(session.history.folder / SCORE_LOG, spec)
    result = SearchResult(spec, space.layout, space.blocks, params, log_path=log.path, run=log.run)
    started = time.perf_counter()
    # The session is held from the first merge to the last: a merge or restore from elsewhere in between
    # would have a candidate's images made by other weights.
    try:
        with session.exclusive():
            _run_candidates(session, spec, space, optimizer, params, scorer, result, log, on_candidate, stop,
                            on_progress)
    finally:
        result.seconds = time.perf_counter() - started
    return result


def _run_candidates(session: MergeSession, spec: SearchSpec, space: SearchSpace, optimizer, params: GenerationParams,
                    scorer: Scorer, result: SearchResult, log: ScoreLog, on_candidate, stop,
                    on_progress: ProgressCallback | None) -> None:
    """Ask, merge, generate, score and tell until the budget is spent or ``stop()``; then the best goes in."""
    while len(result.candidates) < spec.budget and not (stop is not None and stop()) and not session.halted:
        point = optimizer.ask()
        candidate, images = _candidate(session, space, params, scorer, point, len(result.candidates) + 1, result,
                                       on_progress)
        optimizer.tell(point, candidate.score)
        result.candidates.append(candidate)
        log.add(candidate)
        if on_candidate is not None:
            on_candidate(candidate, candidate.score, images)
    result.stopped = len(result.candidates) < spec.budget
    if spec.restore:  # asked for: no candidate is left in the model
        session.restore()
        result.restored = True
    else:
        result.final_history_id = _swap_in_best(session, result, on_progress)
    log.finish(result)


def _candidate(session: MergeSession, space: SearchSpace, params: GenerationParams, scorer: Scorer, point: Point,
               number: int, result: SearchResult, on_progress: ProgressCallback | None
               ) -> tuple[Candidate, list[Image.Image]]:
    """Merge (only the changed keys), generate and score one point; its history entry names the run
    and the candidate (``extra["search"]``)."""
    recipe = space.recipe_for(point)
    name = f"candidate {number} ({space.side} {space.weights(point).as_readable()})"
    try:
        outcome = session.merge(recipe, only_changed=True, on_progress=on_progress,
                                history_extra={"search": {"run": result.run, "candidate": number}})
    except MergeError as error:
        raise SearchError(f"{name}: {error}", result) from error
    result.warnings.extend(outcome.warnings)
    try:
        images = list(session.generate(params).images)
    except Exception as error:  # the host's generator (e.g. out of GPU memory): end the search, naming the candidate
        # A MergeError is the session's own sentence (it names the merge swapped in); others get their type.
        what = str(error) if isinstance(error, MergeError) else f"{type(error).__name__}: {error}"
        raise SearchError(f"{name}: generating failed: {what}", result) from error
    if not images:
        raise SearchError(f"{name}: the generator returned no image", result)
    try:
        score = float(scorer(images, params))
    except Exception as error:  # the host's code: any failure ends the search, naming the candidate
        raise SearchError(f"{name}: the scorer failed: {type(error).__name__}: {error}", result) from error
    if not math.isfinite(score):
        raise SearchError(f"{name}: the scorer gave {score}, not a finite number", result)
    candidate = Candidate(number, point, getattr(outcome.recipe, f"weights_{space.side}"), outcome.recipe, score,
                          outcome.history_id, outcome.rewritten)
    return candidate, images


def _swap_in_best(session: MergeSession, result: SearchResult, on_progress: ProgressCallback | None) -> int | None:
    """Merge the best candidate again unless it is what the model holds; its history ID, or None.
    Its history entry says it is the run's best (``extra["search"]["best"]``)."""
    best = result.best
    current = session.current
    if best is None or (current is not None and current.recipe == best.recipe):
        return None
    try:
        return session.merge(best.recipe, only_changed=True, on_progress=on_progress,
                             history_extra={"search": {"run": result.run, "best": best.number}}).history_id
    except MergeError as error:
        raise SearchError(f"swapping in the best candidate ({best.number}): {error}", result) from error


class ScoreLog:
    """``search_scores.jsonl``: one line per scored candidate (run, number, history ID, score, weights),
    and one per finished run (its best). Appended line by line, so a crash keeps the scores made."""

    def __init__(self, path: Path, spec: SearchSpec):
        self.path = path
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self._about = {"side": spec.side, "optimizer": spec.optimizer, "seed": spec.seed}

    def add(self, candidate: Candidate) -> None:
        self._append({"run": self.run, "candidate": candidate.number, "history_id": candidate.history_id,
                      "score": candidate.score, "weights": candidate.weights, **self._about})

    def finish(self, result: SearchResult) -> None:
        best = result.best
        self._append({"run": self.run, "best": best.number if best else None,
                      "best_history_id": best.history_id if best else None,
                      "final_history_id": result.final_history_id, "stopped": result.stopped})

    def _append(self, entry: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry, ensure_ascii=False) + "\n")


def scores_by_history_id(folder: Path) -> dict[int, float]:
    """Each searched merge's score by its history ID, for showing beside the history (unreadable lines skipped).

    Example:
        >>> scores_by_history_id(session.history.folder)[17]
        0.912
    """
    scores: dict[int, float] = {}
    try:
        lines = (Path(folder) / SCORE_LOG).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return scores
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("history_id"), int) and "score" in entry:
            scores[entry["history_id"]] = entry["score"]
    return scores


# --- the API's way in ------------------------------------------------------------------------------


SPEC_FIELDS = ("recipe", "params", "side", "blocks", "bounds", "budget", "seed", "optimizer", "children", "restore")


def spec_from_dict(data: Mapping[str, Any], default_params: GenerationParams) -> SearchSpec:
    """A SearchSpec from a JSON body: ``recipe`` (a recipe object), ``params`` (txt2img fields over
    ``default_params``), and any of side, blocks, bounds, budget, seed, optimizer, children, restore.

    Example:
        >>> spec_from_dict({"recipe": {"model_a": "a", "model_b": "b"}, "budget": 8}, host.default_generation())
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"a search request is a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_FIELDS))
    if unknown:
        raise RecipeError(f"unknown search field(s): {', '.join(unknown)}; expected {', '.join(SPEC_FIELDS)}")
    if "recipe" not in data:
        raise RecipeError("a search request needs a recipe")
    params = data.get("params") or {}
    known = {f.name for f in dataclasses.fields(GenerationParams)}
    if not isinstance(params, Mapping) or set(params) - known:
        raise RecipeError(f"params must be an object of {', '.join(sorted(known))}; got {params!r}")
    options = {name: data[name] for name in SPEC_FIELDS[2:] if name in data}
    for name in ("blocks", "bounds"):
        if isinstance(options.get(name), list):
            options[name] = tuple(options[name])
    return SearchSpec(Recipe.from_dict(data["recipe"]), dataclasses.replace(default_params, **params), **options)
