"""Auto-merge search (mergers/search.py): the optimizers on synthetic objectives, the built-in scorers,
and whole searches that merge tiny real-layout SD1 models into a live model and score generated images."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from mergers.arch.blocks import block_of
from mergers.arch.layouts import block_ids
from mergers.checkpoint import open_checkpoint
from mergers.errors import RecipeError
from mergers.host import Generated, GenerationParams
from mergers.recipe import Recipe
from mergers.search import (
    SCORE_LOG,
    CoordinateSearch,
    EvolutionStrategy,
    SearchError,
    SearchSpec,
    builtin_scorer,
    run_search,
    scores_by_history_id,
    search_space,
    sharpness,
    similarity_to,
    spec_from_dict,
)
from mergers.session import MergeBusy, MergeSession
from tests.test_a1111 import _host, checkpoints, webui  # noqa: F401 - pytest fixtures
from tests.ui_host import UiHost, weights_checksum, write_models

BASE = Recipe(model_a="a.safetensors", model_b="b.safetensors")
PARAMS = GenerationParams(prompt="a tiny cat", steps=4, width=32, height=32, seed=5)
BLOCKS = ("IN04", "M00", "OUT05")  # a few blocks keep the partial re-merges small
MODELS = {"a.safetensors": ("sd1", 1), "b.safetensors": ("sd1", 2), "c.safetensors": ("sd1", 3)}


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


def _ui_host(root, host_class=UiHost) -> UiHost:
    """A UiHost over the SD1 models alone (it hashes every file on each lookup: no SDXL one to hash)."""
    write_models(root / "models", MODELS)
    return host_class(root / "models", root / "data")


def _session(root) -> MergeSession:
    session = MergeSession(_ui_host(root))
    merge = session.merge
    session.merges = []  # every recipe merged, in order
    session.merge = lambda recipe, **options: session.merges.append(recipe) or merge(recipe, **options)
    return session


def _red(images, params) -> float:
    """UiHost paints one colour from the weights' checksum: any deterministic number of it will do."""
    return float(np.asarray(images[0].convert("RGB"))[0, 0, 0])


def _spec(**changes) -> SearchSpec:
    return SearchSpec(**{"recipe": BASE, "params": PARAMS, "blocks": BLOCKS, "budget": 6, "seed": 1, **changes})


def _quadratic(target):
    return lambda point: -sum((x - t) ** 2 for x, t in zip(point, target, strict=True))


def _optimise(optimizer, objective, budget):
    for _ in range(budget):
        point = optimizer.ask()
        optimizer.tell(point, objective(point))
    return optimizer


# --- optimizers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_evolution_strategy_finds_the_optimum_of_a_quadratic_within_budget(seed):
    target = (0.2, 0.9, 0.35)
    es = _optimise(EvolutionStrategy((0.5, 0.5, 0.5), 0.0, 1.0, seed=seed), _quadratic(target), 100)
    assert max(abs(x - t) for x, t in zip(es.best, target)) < 0.05
    assert es.sigma < 0.2  # the 1/5th rule shrank the step as it closed in


def test_coordinate_search_reaches_a_quadratic_optimum_inside_and_on_the_bounds():
    target = (0.2, 0.9, 0.35, 0.6, 0.0, 1.0)
    search = _optimise(CoordinateSearch((0.5,) * 6, 0.0, 1.0, seed=1), _quadratic(target), 80)
    assert max(abs(x - t) for x, t in zip(search.best, target)) < 0.02


@pytest.mark.parametrize("make", [lambda seed: EvolutionStrategy((0.5,) * 4, 0.0, 1.0, seed=seed, children=3),
                                  lambda seed: CoordinateSearch((0.5,) * 4, 0.0, 1.0, seed=seed)])
def test_an_optimizer_repeats_its_points_for_a_seed_and_starts_at_the_start(make):
    def points(seed):
        optimizer, objective, asked = make(seed), _quadratic((0.1, 0.7, 0.3, 0.9)), []
        for _ in range(15):
            asked.append(optimizer.ask())
            optimizer.tell(asked[-1], objective(asked[-1]))
        return asked

    assert points(1) == points(1) != points(2)
    assert points(1)[0] == (0.5,) * 4
    assert all(0 <= x <= 1 and round(x, 3) == x for point in points(1) for x in point)


def test_an_optimizer_wants_each_score_before_the_next_point():
    es = EvolutionStrategy((0.5,), 0.0, 1.0, seed=1)
    point = es.ask()
    with pytest.raises(RecipeError, match="tell the score"):
        es.ask()
    with pytest.raises(RecipeError, match="asked was"):
        es.tell((0.25,), 1.0)
    es.tell(point, 1.0)
    with pytest.raises(RecipeError, match="lower < upper"):
        CoordinateSearch((0.5,), 1.0, 1.0, seed=1)


# --- scorers ---------------------------------------------------------------------------------------


def test_sharpness_scores_detail_above_blur_and_a_flat_image_zero():
    board = Image.fromarray((np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8))
    blurred = board.filter(ImageFilter.GaussianBlur(2))
    assert sharpness([board], PARAMS) > sharpness([blurred], PARAMS) > 0
    assert sharpness([Image.new("RGB", (32, 32), (9, 90, 200))], PARAMS) == 0.0
    assert builtin_scorer("sharpness") is sharpness


def test_similarity_is_one_for_the_reference_and_falls_with_distance():
    reference = Image.new("RGB", (16, 16), (0, 0, 0))
    score = builtin_scorer("similarity", reference=reference)
    assert score([reference.resize((40, 40))], PARAMS) == 1.0
    assert score([Image.new("RGB", (16, 16), (255, 255, 255))], PARAMS) == 0.0
    assert score([Image.new("RGB", (16, 16), (51, 51, 51))], PARAMS) == pytest.approx(0.8)
    with pytest.raises(Exception, match="reference image"):
        builtin_scorer("similarity")


# --- the searched space ---------------------------------------------------------------------------


def test_the_space_defaults_to_every_block_and_keeps_the_base_weights_of_the_others():
    everything = search_space(_spec(blocks=None), "sd1")
    assert everything.blocks == block_ids("sd1") and everything.start() == (0.5,) * 26
    some = search_space(_spec(recipe=BASE.with_changes(weights_alpha="ALL:0.25, M00:1"), blocks="in04, mid"), "sd1")
    assert some.blocks == ("IN04", "M00") and some.start() == (0.25, 1.0)
    weights = some.weights((0.75, 0.125))
    assert weights.value_of("IN04") == 0.75 and weights.value_of("M00") == 0.125
    assert weights.value_of("OUT05") == 0.25
    assert some.recipe_for((0.75, 0.125)).weights_alpha == weights.as_text()
    assert some.recipe.seed == 1  # the base's random seed (-1) is fixed, so only the weights differ


@pytest.mark.parametrize(("changes", "message"), [
    ({"side": "beta"}, "does not use beta"),
    ({"side": "gamma"}, "side must be"),
    ({"optimizer": "annealing"}, "unknown optimizer"),
    ({"budget": 0}, "budget"),
    ({"bounds": (1, 0)}, "lower < upper"),
    ({"recipe": BASE.with_changes(mode="ties", model_c="c.safetensors"), "side": "beta", "bounds": (0, 2)},
     "needs 0.0 ≤ beta ≤ 1.0"),
])
def test_a_spec_refuses_what_cannot_be_searched(changes, message):
    with pytest.raises(RecipeError, match=message):
        _spec(**changes)


def test_unknown_blocks_are_named():
    with pytest.raises(RecipeError, match="IN12, OUT99"):
        search_space(_spec(blocks=("IN01", "IN12", "OUT99")), "sd1")


def test_a_spec_reads_from_a_json_body_over_the_host_defaults():
    spec = spec_from_dict({"recipe": BASE.to_dict(), "params": {"seed": 9}, "blocks": ["IN00", "OUT11"],
                           "bounds": [0.1, 0.9], "budget": 4, "optimizer": "coordinate"}, PARAMS)
    assert spec.params.seed == 9 and spec.params.prompt == "a tiny cat"
    assert (spec.blocks, spec.bounds, spec.budget, spec.optimizer) == (("IN00", "OUT11"), (0.1, 0.9), 4, "coordinate")
    with pytest.raises(RecipeError, match="unknown search field"):
        spec_from_dict({"recipe": BASE.to_dict(), "steps": 3}, PARAMS)


# --- whole searches in a session -------------------------------------------------------------------


def test_a_search_of_budget_6_merges_6_candidates_scores_them_and_swaps_in_the_best(tmp_path):
    session = _session(tmp_path)
    seen = []
    result = run_search(session, _spec(), _red, on_candidate=lambda c, score, images: seen.append((c, score, images)))

    candidates = result.candidates
    assert [c.number for c in candidates] == [1, 2, 3, 4, 5, 6] and not result.stopped
    assert session.merges[:6] == [c.recipe for c in candidates]
    assert [c.recipe.weights_alpha for c in candidates] == [c.weights for c in candidates]
    assert candidates[0].rewritten is None and all(c.rewritten is not None for c in candidates[1:])
    assert [(c, s) for c, s, _ in seen] == [(c, c.score) for c in candidates]
    assert all(len(images) == 1 and images[0].size == (64, 64) for _, _, images in seen)
    best = result.best
    assert best.score == max(c.score for c in candidates)
    # The best is in the model now: merged again at the end unless it was the last candidate.
    assert session.current.recipe == best.recipe
    assert len(session.merges) == 6 + (best is not candidates[-1])
    assert _red(session.generate(PARAMS).images, PARAMS) == best.score
    assert all(p.seed == 5 for p in session.host.generated)
    # Every candidate is a merge in the history; its score is in the log beside it, by history ID.
    history_ids = [entry.id for entry in session.history.entries(newest_first=False)]
    assert [c.history_id for c in candidates] == history_ids[:6]
    assert scores_by_history_id(session.history.folder) == {c.history_id: c.score for c in candidates}
    lines = [json.loads(line) for line in (session.history.folder / SCORE_LOG).read_text(encoding="utf-8").splitlines()]
    assert lines[-1]["best"] == best.number and lines[-1]["final_history_id"] == result.final_history_id
    answer = json.loads(json.dumps(result.to_dict()))
    assert answer["best"]["number"] == best.number and len(answer["candidates"]) == 6
    assert Recipe.from_dict(answer["best_recipe"]) == best.recipe


def test_the_same_seed_gives_the_same_candidates(tmp_path):  # other seeds, other points: the optimizer tests
    def candidates(folder):
        return [(c.weights, c.score) for c in run_search(_session(tmp_path / folder), _spec(budget=3), _red).candidates]

    first = candidates("one")
    assert first == candidates("two") and len({weights for weights, _ in first}) == 3


def test_stop_ends_the_search_after_the_current_candidate_and_keeps_the_best(tmp_path):
    session, stop = _session(tmp_path), threading.Event()
    result = run_search(session, _spec(optimizer="coordinate"), _red, stop=stop.is_set,
                        on_candidate=lambda c, score, images: c.number == 2 and stop.set())
    assert len(result.candidates) == 2 and result.stopped and "stopped" in result.summary
    assert session.current.recipe == result.best.recipe


def test_a_failing_scorer_names_the_candidate_and_keeps_what_was_scored(tmp_path):
    session = _session(tmp_path)

    def scorer(images, params):
        if len(session.merges) == 3:
            raise ValueError("no face found")
        return _red(images, params)

    with pytest.raises(SearchError, match=r"candidate 3 \(alpha .*IN04.*\): the scorer failed: ValueError: no face"):
        run_search(session, _spec(), scorer)
    with pytest.raises(SearchError, match="candidate 1 .*gave nan, not a finite number") as nan:
        run_search(session, _spec(), lambda images, params: float("nan"))
    assert nan.value.result.candidates == []


def test_a_search_holds_the_session_against_merges_and_restores_from_elsewhere(tmp_path):
    """Between a candidate's merge and its score no one else may swap other weights in."""
    session, refusals = _session(tmp_path), []

    def meddle(candidate, score, images):  # another user of the tab or the API, on another thread
        def other():
            for action in (lambda: session.merge(BASE), session.restore):
                try:
                    action()
                except MergeBusy as error:
                    refusals.append(str(error))
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()

    result = run_search(session, _spec(budget=2), _red, on_candidate=meddle)
    assert len(refusals) == 4 and all("auto-merge search" in r for r in refusals)
    assert session.current.recipe == result.best.recipe
    session.merge(BASE)  # free again once the search is over


def test_a_failing_generator_names_the_candidate(tmp_path):
    session = _session(tmp_path)

    def broken(params):
        raise RuntimeError("CUDA out of memory")

    session.host.generate = lambda params, **extra: broken(params)
    with pytest.raises(SearchError, match=r"candidate 1 .*generating failed: RuntimeError: CUDA out of memory"):
        run_search(session, _spec(), _red)


def test_a_merge_that_fails_midway_leaves_the_model_as_loaded_and_restorable(tmp_path):
    session = _session(tmp_path)
    live = session.host.live_model()
    original = weights_checksum(live.tensors())
    calls = []

    def cancel_third_merge(done, total, *rest):
        calls.append(len(session.merges))
        if len(session.merges) == 3 and calls.count(3) == 2:  # a few keys into candidate 3
            session.stop()

    with pytest.raises(SearchError, match=r"candidate 3 .*cancelled") as failed:
        run_search(session, _spec(), _red, on_progress=cancel_third_merge)
    assert len(failed.value.result.candidates) == 2
    assert weights_checksum(live.tensors()) == original  # the session put model A back
    session.restore()
    assert weights_checksum(live.tensors()) == original
    assert len(run_search(session, _spec(budget=1), _red).candidates) == 1  # and it searches on


class StripeHost(UiHost):
    """Paints one grey stripe per block: the block's ratio of model B, read back from the live weights."""

    def stripes(self, blocks):
        with open_checkpoint(self.models_dir / "a.safetensors") as a, open_checkpoint(self.models_dir / "b.safetensors") as b:
            keys = [next(k for k in a if block_of(k, "sd1") == block and a[k].is_floating_point()
                         and not torch.equal(a[k], b[k])) for block in blocks]
            self.probes = [(key, a[key].float(), b[key].float()) for key in keys]

    def generate(self, params, *, extra_info):
        live = {key: tensor.detach() for key, tensor in self.live_model().tensors().items()}
        ratios = [float(((live[k].float() - a) * (b - a)).sum() / ((b - a) ** 2).sum()) for k, a, b in self.probes]
        row = np.clip(np.round(np.array(ratios) * 255), 0, 255).astype(np.uint8)
        return Generated([Image.fromarray(np.repeat(row[None, :], 8, axis=0))], "")


def test_a_search_moves_the_merge_toward_a_reference_image(tmp_path):
    host = _ui_host(tmp_path, StripeHost)
    host.stripes(BLOCKS)
    target = (0.2, 0.8, 0.5)
    reference = Image.fromarray(np.repeat(np.round(np.array(target) * 255).astype(np.uint8)[None, :], 8, axis=0))
    result = run_search(MergeSession(host), _spec(optimizer="coordinate", budget=8), similarity_to(reference))
    start, best = result.candidates[0], result.best
    assert start.score == pytest.approx(0.8, abs=0.01)  # (0.5, 0.5, 0.5): 0.2 from the target on average
    assert best.score > 0.95 and max(abs(v - t) for v, t in zip(best.values, target)) < 0.1


def test_a_search_in_the_a1111_stand_in_scores_real_generations_with_sharpness(webui, tmp_path):  # noqa: F811
    session = MergeSession(_host(webui, tmp_path))
    result = run_search(session, _spec(), sharpness)
    assert len(result.candidates) == 6 and len({c.score for c in result.candidates}) == 6
    generations = webui.processing.processed_log
    assert len(generations) == 6 and {p.seed for p, _ in generations} == {5}
    assert session.current.recipe == result.best.recipe
    final = session.generate(PARAMS)
    assert sharpness(final.images, PARAMS) == result.best.score
    assert f"SuperMerger ID: {session.current.history_id}" in final.infotext


def test_the_sessions_stop_between_merges_ends_the_search_after_the_current_candidate(tmp_path):
    """Stop (the tab's or the API's /cancel) pressed while a candidate generates is not lost."""
    session = _session(tmp_path)
    result = run_search(session, _spec(), _red, on_candidate=lambda c, score, images: c.number == 2 and session.stop())
    assert len(result.candidates) == 2 and result.stopped
    assert len(run_search(session, _spec(budget=2), _red).candidates) == 2  # the next search starts afresh
