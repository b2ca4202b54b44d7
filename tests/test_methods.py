"""Every registered merge method: known answers on literal tensors, and generic properties."""

import pytest
import torch

from mergers.errors import RecipeError
from mergers.methods import METHODS, get_method, method_for
from mergers.methods.basic import add_difference, sum_twice, triple_sum, weight_sum

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
C = torch.tensor([[1.0, 1.0], [2.0, 2.0]])


def test_weight_sum_known_answer():
    # (1 - 0.25) * A + 0.25 * B
    assert torch.allclose(weight_sum(A, B, alpha=0.25), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_add_difference_known_answer():
    # A + 0.5 * (B - C) = A + 0.5 * [[4, 5], [5, 6]]
    assert torch.equal(add_difference(A, B, C, alpha=0.5), torch.tensor([[3.0, 4.5], [5.5, 7.0]]))


def test_triple_sum_known_answer():
    # (1 - 0.2 - 0.3) * A + 0.2 * B + 0.3 * C
    expected = torch.tensor([[1.8, 2.5], [3.5, 4.2]])
    assert torch.allclose(triple_sum(A, B, C, alpha=0.2, beta=0.3), expected)


def test_triple_sum_with_zero_weights_is_a():
    assert torch.equal(triple_sum(A, B, C, alpha=0.0, beta=0.0), A)


def test_sum_twice_known_answer():
    # ((1 - 0.5) * A + 0.5 * B) * (1 - 0.25) + 0.25 * C = [[3, 4], [5, 6]] * 0.75 + 0.25 * C
    expected = torch.tensor([[2.5, 3.25], [4.25, 5.0]])
    assert torch.allclose(sum_twice(A, B, C, alpha=0.5, beta=0.25), expected)


# Keywords every method may take besides alpha/beta; cosine stats as a whole-model pass would give.
EXTRA = {"gamma": 0.3, "seed": 7, "key": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
         "sims_min": -0.5, "sims_max": 1.0}
# Methods that the original defines so that alpha = 0 (and beta = 0) does NOT give A.
NOT_A_AT_ZERO = {"cosine_a", "cosine_b", "cosine_a_consistent", "extract"}


def _call(method, a, b, c, **params):
    models = (a, b, c)[: method.models]
    params = {**EXTRA, **params}
    return method.func(*models, **{k: v for k, v in params.items() if k in method.params})


@pytest.mark.parametrize("name", sorted(set(METHODS) - NOT_A_AT_ZERO))
def test_zero_ratios_give_a(name):
    method = METHODS[name]
    out = _call(method, A, B, C, alpha=0.0, beta=0.0)
    assert torch.equal(out, A)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identical_inputs_give_a(name):
    """Merging a model with itself changes nothing (self and plus random scale or add by design)."""
    if name in ("self", "plus_random"):
        pytest.skip("changes A by design")
    out = _call(METHODS[name], A, A.clone(), A.clone(), alpha=0.4, beta=0.3)
    assert torch.allclose(out, A)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("shape", [(5, 3), (6,), (4, 2, 3, 3)])
def test_results_are_finite_and_shaped_like_a(name, shape):
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=generator) for _ in range(3))
    out = _call(METHODS[name], a, b, c, alpha=0.3, beta=0.2)
    assert out.shape == a.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inputs_are_not_modified(name):
    a, b, c = A.clone(), B.clone(), C.clone()
    _call(METHODS[name], a, b, c, alpha=0.4, beta=0.3)
    assert torch.equal(a, A) and torch.equal(b, B) and torch.equal(c, C)


def test_alpha_one_gives_b_exactly():
    b = torch.randn(64)
    assert torch.equal(weight_sum(torch.randn(64), b, alpha=1.0), b)


def test_add_difference_with_b_equal_c_gives_a():
    b = torch.randn(8).half()
    a = torch.randn(8).half()
    assert torch.equal(add_difference(a, b, b.clone(), alpha=0.7), a)


def test_sum_twice_with_beta_zero_is_weight_sum():
    assert torch.allclose(sum_twice(A, B, C, alpha=0.3, beta=0.0), weight_sum(A, B, alpha=0.3))


def test_triple_sum_with_beta_zero_is_weight_sum():
    assert torch.allclose(triple_sum(A, B, C, alpha=0.3, beta=0.0), weight_sum(A, B, alpha=0.3))


def test_registry_rows():
    rows = {m.name: (m.models, m.params, m.precision) for m in METHODS.values()}
    assert rows["weight_sum"] == (2, ("alpha", "out"), "native")  # out: a reused result buffer
    assert rows["add_difference"] == (3, ("alpha", "out"), "native")
    assert rows["triple_sum"] == (3, ("alpha", "beta"), "native")
    assert rows["sum_twice"] == (3, ("alpha", "beta"), "fp32")
    assert rows["extract"] == (3, ("alpha", "beta", "gamma"), "fp32")
    assert rows["plus_random"] == (2, ("alpha", "seed", "key"), "fp32")


@pytest.mark.parametrize("mode, name", [
    ("Weight sum", "weight_sum"), ("Add difference", "add_difference"), ("Triple sum", "triple_sum"),
    ("sum Twice", "sum_twice"), ("weight_sum", "weight_sum"), ("Weight sum:A*(1-alpha)+B*alpha", "weight_sum"),
])
def test_ui_names_and_snake_case_resolve(mode, name):
    assert method_for(mode, "normal").name == name


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(RecipeError, match="did you mean 'add_difference'"):
        method_for("add diference")
    with pytest.raises(RecipeError, match="unknown calculation mode 'cosineZ'"):
        method_for("Weight sum", "cosineZ")
    with pytest.raises(RecipeError, match="unknown merge method"):
        get_method("nope")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.77, 0.123456789])
def test_native_weight_sum_equals_the_originals_fp32_lerp(dtype, alpha):
    """Why weight_sum may run natively: lerp on fp16/bf16 rounds once, like the original's fp32 round trip."""
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(100_003, generator=generator).to(dtype) for _ in range(2))
    assert torch.equal(weight_sum(a, b, alpha=alpha), torch.lerp(a.float(), b.float(), alpha).to(dtype))
