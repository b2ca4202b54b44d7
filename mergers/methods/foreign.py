"""Merge methods that compute as another tool computes, so replaying its recipe reproduces its file.

Two calculation modes (mergers/methods/modes.py):

- ``"A1111"``: AUTOMATIC1111's Checkpoint Merger (modules/extras.py ``run_modelmerger``, v1.10.1).
  It computes in the inputs' own dtype, weighted sum as ``(1 − α)·A + α·B`` (three fp16 roundings
  for fp16 inputs, where our lerp rounds once) and add difference as ``A + α·(B − C)`` (the same
  three roundings as ours, so that pair runs our ``add_difference``).
- ``"sd-mecha"``: sd-mecha 1.x's built-in methods as ``sd_mecha.merge`` runs them by default: inputs
  cast to fp32 (``merge_dtype``), ratios as fp32 tensors, its own formulas and operation order;
  the output dtype is the recipe's (sd-mecha writes fp16 unless told otherwise).

The formulas are sd-mecha's as documented by its behaviour (tests compare with the real package);
they differ from ours where the notes say so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mergers.methods.registry import merge_method

# sd-mecha's defaults that a replay must match (other values are refused when a recipe is read).
MECHA_COS_EPS = 1e-6  # model_stock
MECHA_MEDIAN = {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}  # geometric_median's Weiszfeld settings


# A1111 ---------------------------------------------------------------------------------------

@merge_method("a1111_weight_sum", elementwise=True, label="Weight sum (A1111)", precision="native",
              formula="(1−α)·A + α·B in the inputs' dtype, as A1111 computes it")
def a1111_weight_sum(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """A1111's weighted sum: each product and the sum rounded to the inputs' dtype.

    Bit for bit when A and B share a dtype (tests/test_interop.py). Where they differ the engine
    widens both first, while A1111 rounds α·B in B's dtype: then within half a unit in the last
    place of α·B in B's dtype, plus fp32 rounding (tested). A1111's save_as_half halves only merged
    keys; a replay's dtype applies to every key.
    """
    return ((1 - alpha) * a) + (alpha * b)


# sd-mecha ------------------------------------------------------------------------------------

def _ratio(alpha: float, like: Tensor) -> Tensor:
    """A ratio as sd-mecha hands it to a method: a 0-dim tensor in the merge dtype."""
    return torch.tensor(alpha, dtype=like.dtype, device=like.device)


@merge_method("mecha_weighted_sum", label="Weight sum (sd-mecha)", formula="lerp(A, B, α) in fp32")
def mecha_weighted_sum(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """sd-mecha's weighted_sum: A or B outright when α is (close to) 0 or 1, else lerp."""
    if math.isclose(alpha, 0.0):
        return a
    if math.isclose(alpha, 1.0):
        return b
    return torch.lerp(a, b, _ratio(alpha, a))


def _mecha_add(a: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """sd-mecha's add_difference of a ready delta: A + α·delta as one addcmul; A when α ≈ 0."""
    if math.isclose(alpha, 0.0):
        return a
    return a.addcmul(delta, _ratio(alpha, a))


@merge_method("mecha_add_difference", label="Add difference (sd-mecha)", formula="addcmul(A, B − C, α) in fp32")
def mecha_add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    return _mecha_add(a, b - c, alpha)


@merge_method("mecha_slerp", label="SLERP (sd-mecha)",
              formula="slerp of A/|A| and B/|B|, scaled by lerp(|A|, |B|, α); lerp where that is NaN")
def mecha_slerp(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """sd-mecha's slerp: unlike ours it interpolates the directions and the norms separately."""
    ratio = _ratio(alpha, a)
    a_unit, b_unit = a / a.norm(), b / b.norm()
    omega = torch.arccos((a_unit * b_unit).sum().clamp(-1, 1))
    result = (a_unit * torch.sin((1 - ratio) * omega) + b_unit * torch.sin(ratio * omega)) / torch.sin(omega)
    result *= torch.lerp(a.norm(), b.norm(), ratio)
    return torch.lerp(a, b, ratio) if result.isnan().any() else result


@merge_method("mecha_add_perpendicular", label="Add perpendicular (sd-mecha)",
              formula="A + α·(B − C minus its projection on A − C) in fp32")
def mecha_add_perpendicular(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """sd-mecha's add_perpendicular: its projection is taken through A − C scaled by its norm."""
    base, delta = a - c, b - c
    norm = torch.linalg.norm(base)
    perpendicular = delta - base * (base / norm * (delta / norm)).sum()
    if perpendicular.isnan().any():  # A = C: sd-mecha adds nothing
        perpendicular = torch.zeros_like(base)
    return _mecha_add(a, perpendicular, alpha)


def _mecha_top_k(delta: Tensor, k: float) -> Tensor:
    """sd-mecha's trim: keep magnitudes at or above the int((1 − k)·n)-th smallest (at least the 1st)."""
    rank = max(int((1 - k) * delta.numel()), 1)
    threshold = delta.flatten().abs().float().kthvalue(rank).values
    return delta * (delta.abs() >= threshold).float()


@merge_method("mecha_ties", label="TIES (sd-mecha)",
              formula="A + α·ties_sum(B − A, C − A; k = β): signs elected by count, mean of those that agree")
def mecha_ties(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float, beta: float) -> Tensor:
    """sd-mecha's ties_sum (vote_sgn off: each entry's sign is the majority of the models' signs)."""
    deltas = torch.stack([_mecha_top_k(m - a, beta) for m in (b, c, *more)])
    signs = torch.sign(deltas)
    agree = (signs == torch.sign(signs.sum(dim=0))).float()
    merged = torch.nan_to_num((deltas * agree).sum(dim=0) / agree.sum(dim=0), nan=0, posinf=0, neginf=0)
    return _mecha_add(a, merged, alpha)


@merge_method("mecha_model_stock", label="Model Stock (sd-mecha)",
              formula="A + α·t·mean(B − A, C − A), t from the cosines along the last dimension")
def mecha_model_stock(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float) -> Tensor:
    """sd-mecha's model_stock: unlike ours, the cosine is per row (last dimension) and of neighbours only."""
    deltas = [m - a for m in (b, c, *more)]
    count = len(deltas)
    cosines = [F.cosine_similarity(deltas[i], deltas[i + 1], dim=-1, eps=MECHA_COS_EPS) for i in range(count - 1)]
    cosine = torch.stack(cosines).mean(dim=0)
    t = (count * cosine / (1 + (count - 1) * cosine)).unsqueeze(-1)
    return _mecha_add(a, torch.nan_to_num(t * (sum(deltas) / count)), alpha)


@merge_method("mecha_geometric_median", label="Geometric median (sd-mecha)",
              formula="lerp(A, Weiszfeld median of A, B, C as sd-mecha iterates it, α)")
def mecha_geometric_median(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float) -> Tensor:
    median = _mecha_weiszfeld((a, b, c, *more))
    return median if alpha == 1 else torch.lerp(a, median, alpha)


def _mecha_weiszfeld(points: tuple) -> Tensor:
    """sd-mecha's geometric_median: start at the mean, stop when the objective (with unit weights)
    changes by at most ftol of itself, and return the average under the last weights."""
    ones = torch.ones(len(points), device=points[0].device, dtype=points[0].dtype)
    weights = ones
    median = sum(points) / len(points)
    objective = _mecha_objective(median, points, ones)
    for _ in range(MECHA_MEDIAN["maxiter"]):
        previous = objective
        distances = torch.stack([torch.dist(p, median) for p in points])
        weights = ones / torch.clamp(distances, min=MECHA_MEDIAN["eps"])
        median = _weighted_average(points, weights)
        objective = _mecha_objective(median, points, ones)
        if abs(previous - objective) <= MECHA_MEDIAN["ftol"] * objective:
            break
    return _weighted_average(points, weights)


def _weighted_average(points: tuple, weights: Tensor) -> Tensor:
    return sum(p * weights[i] for i, p in enumerate(points)) / sum(weights)


def _mecha_objective(median: Tensor, points: tuple, weights: Tensor) -> Tensor:
    return torch.mean(torch.stack([torch.dist(p, median) for p in points]) * weights)
