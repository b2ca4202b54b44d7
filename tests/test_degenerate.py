"""Every method gives a finite, documented result on degenerate inputs (issue 21).

All-zero tensors (fresh layers, zero-initialised biases), identical tensors, opposite tensors and
denormal ones: the property test feeds every registered method (and the LoRA SVD) such inputs and
asserts a finite result of A's shape whenever the inputs are finite. Magnitudes stay within ±1e4:
far past real weights (O(1)), short of sums that leave fp16's or fp32's range, which no method can
keep finite (the engine reports those, naming the key).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergers.lora.lowrank import low_rank, low_rank_of_product
from mergers.methods import METHODS
from mergers.methods.calc import cosine_a, cosine_b, tensor_cosine
from mergers.methods.task import model_stock, perpendicular_part, slerp

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = ((5,), (3, 4), (4, 2, 3, 3))  # a bias, a linear weight, a conv kernel
LIMIT = 1e4
KINDS = ("base", "same", "negated", "zeros", "tiny", "other")
KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"

values = st.floats(min_value=-LIMIT, max_value=LIMIT, allow_nan=False, allow_infinity=False, width=32,
                   allow_subnormal=True)


def tensor_of(draw, shape) -> torch.Tensor:
    count = math.prod(shape)
    return torch.tensor(draw(st.lists(values, min_size=count, max_size=count)), dtype=torch.float32).reshape(shape)


@st.composite
def degenerate_inputs(draw, models: int):
    """``models`` tensors of one shape, each the base, a copy, its negation, zeros, denormals or another."""
    shape = draw(st.sampled_from(SHAPES))
    base = tensor_of(draw, shape)
    tensors = []
    for _ in range(models):
        kind = draw(st.sampled_from(KINDS))
        tensors.append({"base": base, "same": base.clone(), "negated": -base, "zeros": torch.zeros(shape),
                        "tiny": base * 1e-42, "other": tensor_of(draw, shape)}[kind])
    return tensors


def ratio(draw, method, name: str, low: float = -1.0, high: float = 2.0) -> float:
    """A ratio within the method's bounds (extract's, the densities), else within [low, high]."""
    for param, lower, upper in method.bounds:
        if param == name:
            low, high = max(low, lower), min(high, upper)
    return draw(st.floats(min_value=low, max_value=high, allow_nan=False))


@st.composite
def method_calls(draw):
    """A registered method, its inputs (fp16 too for those computed in the models' dtype) and its params."""
    method = METHODS[draw(st.sampled_from(sorted(METHODS)))]
    inputs = draw(degenerate_inputs(method.models))
    if method.precision == "native" and draw(st.booleans()):
        inputs = [t.half() for t in inputs]
    params = {"alpha": ratio(draw, method, "alpha"), "beta": ratio(draw, method, "beta"),
              "gamma": ratio(draw, method, "gamma", 0.0, 2.0), "seed": draw(st.integers(0, 2**31)), "key": KEY,
              "out": None}
    if method.prepass is not None:  # the model-wide statistics, as the engine's prepass gathers them
        params.update(method.prepass.reduce([method.prepass.collect(inputs[0], inputs[1])]))
    return method, inputs, {name: params[name] for name in method.params}


@PROPERTY
@given(method_calls())
def test_every_method_is_finite_on_zero_identical_opposite_and_denormal_inputs(call):
    method, inputs, params = call
    result = method.func(*inputs, **params)
    assert result.shape == inputs[0].shape, method.name
    assert torch.isfinite(result).all(), (method.name, params, inputs)


@PROPERTY
@given(degenerate_inputs(2), st.integers(1, 6))
def test_lora_svd_is_finite_on_degenerate_differences(pair, rank):
    a, b = pair
    delta = (a - b).reshape(a.shape[0], -1)
    factors = low_rank(delta, rank)
    assert torch.isfinite(factors.up).all() and torch.isfinite(factors.down).all()
    assert 0.0 <= factors.error <= 1.0 and math.isfinite(factors.kept) and math.isfinite(factors.total)
    k = min(2, *delta.shape)  # a LoRA's up (out, k) and down (k, in), both as degenerate as the inputs
    product = low_rank_of_product(delta[:, :k].contiguous(), delta[:k].contiguous(), rank, tuple(delta.shape))
    assert torch.isfinite(product.up).all() and torch.isfinite(product.down).all()


# --- the documented values --------------------------------------------------------------------


def test_two_zero_tensors_are_identical_and_one_zero_tensor_is_orthogonal():
    zeros, ones = torch.zeros(4, 3), torch.ones(4, 3)
    assert tensor_cosine(zeros, zeros).item() == 1.0
    assert tensor_cosine(zeros, ones).item() == 0.0
    tiny = torch.full((4, 3), 1e-40)  # its squares underflow: the original's 0/0
    assert tensor_cosine(tiny, tiny).item() == 1.0 and tensor_cosine(tiny, -tiny).item() == -1.0


def test_cosine_modes_merge_zero_keys_to_zero_and_an_empty_range_at_its_top():
    zeros = torch.zeros(4, 3)
    for method in (cosine_a, cosine_b):
        assert torch.equal(method(zeros, zeros, alpha=0.3, sims_min=0.0, sims_max=1.0), zeros)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # Every similarity the same (sims_min == sims_max): scaled to 1, so k = 1 − α.
    assert torch.allclose(cosine_b(a, b, alpha=0.25, sims_min=0.5, sims_max=0.5), torch.lerp(b, a, 0.75))


def test_the_finite_cases_keep_the_originals_numbers():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    original = torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.norm(a) * torch.norm(b))
    assert torch.equal(tensor_cosine(a, b), original)


def test_slerp_of_opposite_or_zero_tensors_is_the_lerp():
    a = torch.tensor([1.0, 2.0, -3.0])
    assert torch.equal(slerp(a, -a, alpha=0.5), torch.lerp(a, -a, 0.5))
    assert torch.equal(slerp(torch.zeros(3), a, alpha=0.5), torch.lerp(torch.zeros(3), a, 0.5))


def test_a_denormal_direction_still_removes_its_projection():
    direction = torch.tensor([1e-41, 0.0, 0.0])  # its squared norm underflows to 0
    assert torch.allclose(perpendicular_part(direction, torch.tensor([2.0, 3.0, 0.0])), torch.tensor([0.0, 3.0, 0.0]))
    assert torch.equal(perpendicular_part(torch.zeros(3), torch.ones(3)), torch.ones(3))


def test_model_stock_of_zero_task_vectors_is_the_base():
    base = torch.tensor([1.0, -1.0])
    assert torch.equal(model_stock(base, [base.clone(), base.clone()]), base)


def test_dare_keeps_nothing_below_the_draws_resolution():
    base, tuned = torch.zeros(5), torch.ones(5)
    merged = METHODS["dare"].func(base, tuned, tuned, alpha=1.0, beta=1e-149, seed=0, key=KEY)  # 1/β: inf in fp32
    assert torch.equal(merged, base)


def test_cosine_statistics_drop_infinite_similarities_as_they_drop_nan():
    stats = METHODS["cosine_b"].prepass
    finite = torch.linspace(-0.5, 1.0, 301)
    odd = torch.tensor([float("inf"), float("nan"), -float("inf")])
    assert stats.reduce([finite.numpy(), odd.numpy()]) == stats.reduce([finite.numpy()])
    assert stats.reduce([odd.numpy()]) == {"sims_min": 0.0, "sims_max": 1.0}  # nothing left: the full range
