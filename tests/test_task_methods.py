"""The task-arithmetic family (mergers/methods/task.py): known answers on literal tensors, worked by
hand in the comments, then whole merges of small checkpoints with the real SD1.5 key names."""

import math

import pytest
import torch

from mergers.arch import block_of
from mergers.checkpoint import open_checkpoint
from mergers.demo import tiny_state_dict
from mergers.errors import RecipeError
from mergers.merge import merge_to_file
from mergers.methods import METHODS, MODES, method_for
from mergers.methods.calc import key_seed
from mergers.methods.task import (
    add_perpendicular,
    breadcrumbs_merge,
    dare_merge,
    dare_ties_merge,
    geometric_median,
    geometric_median_merge,
    magnitude_band,
    model_stock,
    model_stock_merge,
    slerp,
    ties,
    ties_merge,
)
from mergers.recipe import Recipe
from mergers.weights import parse_weights
from mergers.writer import save_checkpoint

TASK_MODES = ("slerp", "add_perpendicular", "ties", "dare", "dare_ties", "model_breadcrumbs", "model_stock",
              "geometric_median")
BASE = torch.ones(4)
TASK_B = torch.tensor([4.0, -1.0, 3.0, -2.0])  # B − A
TASK_C = torch.tensor([-5.0, -3.0, 1.0, 2.0])  # C − A
KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def close(actual, expected):
    return torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-5)


# SLERP ----------------------------------------------------------------------------------------

def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle():
    # Ω = π/2: sin((1 − t)·π/2)·A + sin(t·π/2)·B
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(slerp(a, b, alpha=0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    assert close(slerp(a, b, alpha=1 / 3), [math.sqrt(3) / 2, 0.5])


def test_slerp_keeps_the_angle_formula_for_unnormalised_tensors():
    # A = [2, 0], B = [0, 3], Ω = π/2, t = 0.5: sin(π/4)·A + sin(π/4)·B
    assert close(slerp(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), alpha=0.5), [math.sqrt(2), 1.5 * math.sqrt(2)])


def test_slerp_of_parallel_tensors_is_lerp():
    assert close(slerp(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), alpha=0.25), [1.25, 2.5])
    assert close(slerp(torch.zeros(2), torch.tensor([2.0, 4.0]), alpha=0.5), [1.0, 2.0])


def test_slerp_ends_are_a_and_b_exactly():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    assert torch.equal(slerp(a, b, alpha=0.0), a) and torch.allclose(slerp(a, b, alpha=1.0), b)


# TIES, DARE, DARE-TIES, Breadcrumbs ------------------------------------------------------------

def test_magnitude_band():
    # |TASK_B| = 4, 1, 3, 2: the top half is {4, 3}; without the top quarter, the next half is {3, 2}
    assert magnitude_band(TASK_B, keep=0.5).tolist() == [True, False, True, False]
    assert magnitude_band(TASK_B, keep=0.5, drop_top=0.25).tolist() == [False, False, True, True]
    assert not magnitude_band(TASK_B, keep=0.0).any() and magnitude_band(TASK_B, keep=1.0).all()


def test_ties_trims_elects_and_averages_the_agreeing():
    # trim to the top half: B − A → [4, 0, 3, 0], C − A → [−5, −3, 0, 0]
    # elected signs of the sums [−1, −3, 3, 0]: [−, −, +, 0]; agreeing values: −5, −3, 3, none
    # A + 0.5·[−5, −3, 3, 0]
    out = ties_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=0.5, beta=0.5)
    assert close(out, [-1.5, -0.5, 2.5, 1.0])


def test_ties_without_trimming_takes_the_disjoint_mean():
    # sums [−1, −4, 4, 0] → signs [−, −, +, 0]: means of agreeing −5, (−1 −3)/2, (3 + 1)/2, nothing
    out = ties_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=1.0, beta=1.0)
    assert close(out, [-4.0, -1.0, 3.0, 1.0])


def test_ties_over_n_models():
    # three task vectors [2], [1], [−4]: sum −1 → sign −; only −4 agrees
    out = ties(torch.zeros(1), [torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([-4.0])], alpha=1, density=1)
    assert close(out, [-4.0])


def test_dare_at_full_density_is_task_arithmetic():
    # A + 0.5·(TASK_B + TASK_C) = 1 + 0.5·[−1, −4, 4, 0]
    out = dare_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=0.5, beta=1.0, seed=5, key=KEY)
    assert close(out, [0.5, -1.0, 3.0, 1.0])


def _dare_masks(seed, key, density, count=2, size=4):
    generator = torch.Generator().manual_seed(key_seed(seed, key))
    return [torch.rand(size, generator=generator) < density for _ in range(count)]


def test_dare_drops_with_the_keys_seed_and_rescales():
    keep_b, keep_c = _dare_masks(5, KEY, 0.5)
    expected = BASE + 0.5 * (TASK_B * keep_b / 0.5 + TASK_C * keep_c / 0.5)
    out = dare_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=0.5, beta=0.5, seed=5, key=KEY)
    assert torch.equal(out, expected)


def test_dare_is_deterministic_per_seed_and_key():
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1000, generator=generator) for _ in range(3))
    run = lambda seed, key: dare_merge(a, b, c, alpha=1.0, beta=0.3, seed=seed, key=key)
    assert torch.equal(run(1, KEY), run(1, KEY))
    assert not torch.equal(run(1, KEY), run(2, KEY)) and not torch.equal(run(1, KEY), run(1, KEY + "x"))
    assert torch.equal(dare_merge(a, b, c, alpha=1.0, beta=0.0, seed=1, key=KEY), a)


def _disjoint_mean_by_hand(first, second):
    """TIES's elect + disjoint merge, one entry at a time."""
    out = []
    for x, y in zip(first.tolist(), second.tolist()):
        sign = math.copysign(1, x + y) if x + y else 0
        agreeing = [v for v in (x, y) if v != 0 and math.copysign(1, v) == sign]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out)


def test_dare_ties_elects_signs_over_the_dropped_and_rescaled_vectors():
    keep_b, keep_c = _dare_masks(9, KEY, 0.5)
    expected = BASE + 0.5 * _disjoint_mean_by_hand(TASK_B * keep_b / 0.5, TASK_C * keep_c / 0.5)
    out = dare_ties_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=0.5, beta=0.5, seed=9, key=KEY)
    assert close(out, expected)


def test_dare_ties_at_full_density_is_ties():
    out = dare_ties_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=1.0, beta=1.0, seed=1, key=KEY)
    assert close(out, [-4.0, -1.0, 3.0, 1.0])


def test_breadcrumbs_drops_the_outliers_and_the_small():
    # drop the top quarter, keep the next half: B − A → [0, 0, 3, −2], C − A → [0, −3, 0, 2]
    # A + 1·(sum [0, −3, 3, 0])
    out = breadcrumbs_merge(BASE, BASE + TASK_B, BASE + TASK_C, alpha=1.0, beta=0.5, gamma=0.25)
    assert close(out, [1.0, -2.0, 4.0, 1.0])


# Model Stock, geometric median, add perpendicular ------------------------------------------------

def test_model_stock_known_answer():
    # task vectors [1, 0] and [1, 1]: cos θ = 1/√2, t = 2cos/(1 + cos) = 2(√2 − 1); average [1, 0.5]
    t = 2 * (math.sqrt(2) - 1)
    out = model_stock_merge(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), alpha=1.0)
    assert close(out, [t, t / 2])
    half = model_stock_merge(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), alpha=0.5)
    assert close(half, [t / 2, t / 4])


def test_model_stock_of_n_models_and_opposed_ones():
    # three equal task vectors: cos = 1, t = 1 → their average
    assert close(model_stock(torch.zeros(2), [torch.tensor([2.0, 2.0])] * 3), [2.0, 2.0])
    # opposed task vectors (cos < 0) leave the base
    assert close(model_stock_merge(torch.ones(2), torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.1]), alpha=1.0), [1, 1])


def test_geometric_median_known_answers():
    # on a line the geometric median is the median
    assert close(geometric_median([torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([10.0])]), [1.0])
    # an equilateral triangle's Fermat point is its centre
    triangle = [torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, math.sqrt(3)])]
    assert close(geometric_median(triangle), [1.0, math.sqrt(3) / 3])


def test_geometric_median_merge_moves_from_a_by_alpha():
    a, b, c = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([10.0])
    assert close(geometric_median_merge(a, b, c, alpha=1.0), [1.0])
    assert close(geometric_median_merge(a, b, c, alpha=0.5), [0.5])


def test_add_perpendicular_adds_only_the_new_direction():
    # C = [1, 1]: A − C = [1, 0], B − C = [2, 3] → perpendicular part [0, 3]
    c = torch.tensor([1.0, 1.0])
    assert close(add_perpendicular(torch.tensor([2.0, 1.0]), torch.tensor([3.0, 4.0]), c, alpha=1.0), [2.0, 4.0])
    assert close(add_perpendicular(torch.tensor([2.0, 1.0]), torch.tensor([3.0, 4.0]), c, alpha=0.5), [2.0, 2.5])
    # A = C: nothing to be perpendicular to, so it is add difference
    assert close(add_perpendicular(c, torch.tensor([3.0, 4.0]), c, alpha=1.0), [3.0, 4.0])


# Registry, modes and recipes ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", TASK_MODES)
def test_each_method_is_a_merge_mode_with_a_cited_docstring(mode):
    method = method_for(MODES[mode], "normal")
    assert method.name == mode and method_for(mode).name == mode
    assert method.func.__doc__


@pytest.mark.parametrize("mode,beta,gamma,message", [
    ("ties", 1.5, 0.0, "β|beta"), ("dare", -0.1, 0.0, "beta"), ("model_breadcrumbs", 0.5, 2.0, "gamma"),
])
def test_density_and_gamma_out_of_range_are_refused(tmp_path, mode, beta, gamma, message):
    paths = _write_models(tmp_path)
    recipe = Recipe(*map(str, paths[:2]), model_c=str(paths[2]), mode=mode, beta=beta, gamma=gamma)
    with pytest.raises(RecipeError, match=message):
        merge_to_file(recipe, tmp_path / "out.safetensors")


# Whole merges on real SD1.5 key names ------------------------------------------------------------

def _write_models(folder):
    paths = []
    for seed in (1, 2, 3):
        path = folder / f"sd1_{seed}.safetensors"
        if not path.exists():
            save_checkpoint(path, tiny_state_dict("sd1", seed=seed))
        paths.append(path)
    return paths


def _load(path):
    with open_checkpoint(path) as ckpt:
        return {key: ckpt[key] for key in ckpt}


@pytest.mark.parametrize("mode", TASK_MODES)
def test_whole_merge_with_block_weights(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    paths = _write_models(tmp_path)
    weights = "ALL:0.3, OUT:0.8, BASE:0"
    recipe = Recipe(*map(str, paths[:2]), model_c=str(paths[2]), mode=MODES[mode], weights_alpha=weights,
                    beta=0.6, gamma=0.1, seed=77)
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    a, b, c, out = (_load(p) for p in (*paths, result.path))
    method, block_weights = METHODS[mode], parse_weights(weights, "sd1")
    merged = [step.key for step in result.plan.steps if step.action == "merge"]
    assert len(merged) > 1000 and set(out) == set(a)
    for key in merged:
        params = {"alpha": block_weights.value_of(block_of(key, "sd1")), "beta": 0.6, "gamma": 0.1, "seed": 77,
                  "key": key}
        inputs = [t[key].float() for t in (a, b, c)][: method.models]
        expected = method.func(*inputs, **{p: params[p] for p in method.params}).to(a[key].dtype)
        assert torch.equal(out[key], expected), key
    unmerged = set(a) - set(merged)
    assert all(torch.equal(out[key], a[key]) for key in unmerged)


@pytest.mark.parametrize("mode", ["ties", "model_stock", "geometric_median"])
def test_n_model_methods_take_models_past_c(tmp_path, monkeypatch, mode):
    """A recipe's ``more_models`` reach the methods that take N fine-tunes: each key sees A…D."""
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    paths = _write_models(tmp_path)
    fourth = tmp_path / "sd1_4.safetensors"
    save_checkpoint(fourth, tiny_state_dict("sd1", seed=4))
    recipe = Recipe(*map(str, paths[:2]), model_c=str(paths[2]), more_models=(str(fourth),), mode=MODES[mode],
                    alpha=0.7, beta=0.5)
    assert len(recipe.models) == 4
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    tensors = [_load(p) for p in (*paths, fourth)]
    out = _load(result.path)
    method = METHODS[mode]
    key = next(step.key for step in result.plan.steps if step.action == "merge" and "attn2.to_k" in step.key)
    params = {"alpha": 0.7, "beta": 0.5}
    expected = method.func(*(t[key].float() for t in tensors), **{p: params[p] for p in method.params})
    three = method.func(*(t[key].float() for t in tensors[:3]), **{p: params[p] for p in method.params})
    assert torch.equal(out[key], expected.to(out[key].dtype))
    assert not torch.equal(expected, three)  # D counted
