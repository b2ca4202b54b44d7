"""The task-arithmetic family: SLERP, TIES, DARE, DARE-TIES, Model Breadcrumbs, Model Stock,
geometric median and add-perpendicular.

Which model is which (the A/B/C recipe):

- TIES, DARE, DARE-TIES, Model Breadcrumbs, Model Stock: **A is the base** (the pre-trained model),
  B and C are fine-tunes of it; their task vectors are B − A and C − A.
- Add perpendicular keeps "Add difference"'s roles: C is the base of B, and A receives the part of
  B − C that is perpendicular to A − C.
- SLERP interpolates from A to B; geometric median treats A, B and C alike.

Ratios: ``alpha`` scales what is added to A (block weights and elemental ratios apply to it, as to
every method); ``beta`` is the *density*, the fraction of each task vector kept (TIES, DARE,
DARE-TIES, Breadcrumbs); ``gamma`` is the fraction of the largest magnitudes Breadcrumbs drops.
DARE's random drops are drawn per key from the recipe's ``seed`` (the same on any device).

The N-model functions (``ties``, ``dare``, ``model_stock``, ``geometric_median``…) take any number
of fine-tunes; the registered methods call them with B and C.

Example:
    >>> ties(torch.zeros(3), [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0])], alpha=1, density=1)
    tensor([ 1.5000, -2.0000,  3.0000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mergers.methods.calc import key_seed
from mergers.methods.registry import merge_method

DENSITY = (("beta", 0.0, 1.0),)  # beta is a fraction of each task vector
# torch.rand's fp32 draws are multiples of 2^-24: a smaller density could keep only the draws of exactly 0.
DRAW_RESOLUTION = 2.0 ** -24
# Past this cosine A and B are parallel: sin Ω → 0 and SLERP's weights lose precision, while
# lerp differs from SLERP by under 0.01 % there (mergekit uses the same 0.9995).
SLERP_PARALLEL_DOT = 0.9995
# Weiszfeld: distances below this count as "at the point" (no division by zero); stop when the
# estimate moves less than this fraction of its norm, or after this many steps.
MEDIAN_EPS = 1e-8
MEDIAN_TOLERANCE = 1e-6  # fp32 carries ~7 digits; Weiszfeld gets there in 10–20 steps on real tensors
MEDIAN_MAX_STEPS = 100


# Building blocks -----------------------------------------------------------------------

def task_vectors(base: Tensor, models: Sequence[Tensor]) -> list[Tensor]:
    """Each model minus the base (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""
    return [model - base for model in models]


def magnitude_band(delta: Tensor, keep: float, drop_top: float = 0.0) -> Tensor:
    """A bool mask of ``delta``'s entries ranked by magnitude: the largest ``drop_top`` fraction out,
    the next ``keep`` fraction in, the rest out. Entries tied with a threshold go with it.

    Example:
        >>> magnitude_band(torch.tensor([4.0, -1.0, 3.0, 2.0]), keep=0.5, drop_top=0.25).tolist()
        [False, False, True, True]
    """
    size = delta.numel()
    dropped = round(drop_top * size)
    kept = min(round(keep * size), size - dropped)
    if kept <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    mask = magnitude >= _kth_largest(magnitude, dropped + kept)
    if dropped > 0:
        mask &= magnitude < _kth_largest(magnitude, dropped)
    return mask


def _kth_largest(values: Tensor, k: int) -> Tensor:
    return values.reshape(-1).kthvalue(values.numel() - k + 1).values


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's step: keep each entry with probability ``density`` and divide the kept ones by it.

    The mask is drawn on the CPU from ``generator``, so a seed gives the same drops on any device.
    A density under the draw's resolution keeps nothing (its 1/density could overflow the dtype).
    """
    if density >= 1:
        return delta
    if density < DRAW_RESOLUTION:
        return torch.zeros_like(delta)
    kept = torch.rand(delta.shape, generator=generator) < density
    return delta * kept.to(delta.device) / density


def elect_signs(deltas: Sequence[Tensor]) -> Tensor:
    """TIES's sign election: per entry, the sign of the summed task vectors (the larger total mass)."""
    return torch.sign(torch.stack(deltas).sum(dim=0))


def disjoint_mean(deltas: Sequence[Tensor], signs: Tensor) -> Tensor:
    """TIES's disjoint merge: per entry, the mean of the non-zero values whose sign is the elected one."""
    stacked = torch.stack(deltas)
    agrees = (torch.sign(stacked) == signs) & (stacked != 0)
    count = agrees.sum(dim=0)
    total = (stacked * agrees).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _seeded(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, key))


# N-model functions ----------------------------------------------------------------------

def ties(base: Tensor, models: Sequence[Tensor], *, alpha: float, density: float) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708): trim each task vector to its top-``density``
    magnitudes, elect a sign per entry, average the values that agree with it; base + α·that.
    """
    trimmed = [delta * magnitude_band(delta, density) for delta in task_vectors(base, models)]
    return base + alpha * disjoint_mean(trimmed, elect_signs(trimmed))


def dare(base: Tensor, models: Sequence[Tensor], *, alpha: float, density: float,
         generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099): drop each task-vector
    entry with probability 1 − ``density``, rescale the rest by 1/density; base + α·Σ (task arithmetic).
    """
    dropped = [drop_and_rescale(delta, density, generator) for delta in task_vectors(base, models)]
    return base + alpha * torch.stack(dropped).sum(dim=0)


def dare_ties(base: Tensor, models: Sequence[Tensor], *, alpha: float, density: float,
              generator: torch.Generator) -> Tensor:
    """DARE-TIES (Yu et al. 2024, arXiv:2311.03099, §4.3): DARE's random drop and rescale in place of
    TIES's magnitude trim, then TIES's sign election and disjoint mean; base + α·that.
    """
    dropped = [drop_and_rescale(delta, density, generator) for delta in task_vectors(base, models)]
    return base + alpha * disjoint_mean(dropped, elect_signs(dropped))


def breadcrumbs(base: Tensor, models: Sequence[Tensor], *, alpha: float, density: float,
                drop_top: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, arXiv:2312.06795): per task vector, mask out the
    largest ``drop_top`` fraction (outliers) and all but the next ``density`` fraction; base + α·Σ.
    """
    masked = [delta * magnitude_band(delta, density, drop_top) for delta in task_vectors(base, models)]
    return base + alpha * torch.stack(masked).sum(dim=0)


def model_stock(base: Tensor, models: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522, eq. 6): t = N·cos θ / (1 + (N − 1)·cos θ), θ the
    mean angle between the fine-tunes' task vectors; base + α·t·(their average − base). α = 1 is the paper's.

    A negative cosine is taken as 0 (t = 0: the base): the paper's geometry assumes angles under 90°,
    and past them t would leave the segment between the base and the average.
    """
    deltas = task_vectors(base, models)
    cosine = _mean_pairwise_cosine(deltas).clamp(0.0, 1.0)
    count = len(models)
    ratio = count * cosine / (1 + (count - 1) * cosine)
    return base + (alpha * ratio) * torch.stack(deltas).mean(dim=0)


def _mean_pairwise_cosine(deltas: Sequence[Tensor]) -> Tensor:
    flat = [delta.reshape(-1) for delta in deltas]
    pairs = [(i, j) for i in range(len(flat)) for j in range(i + 1, len(flat))]
    if not pairs:
        return torch.ones((), dtype=flat[0].dtype, device=flat[0].device)
    # A zero task vector has no direction: cosine_similarity's eps makes it 0.
    return torch.stack([F.cosine_similarity(flat[i], flat[j], dim=0, eps=MEDIAN_EPS) for i, j in pairs]).mean()


def geometric_median(models: Sequence[Tensor]) -> Tensor:
    """The point with the least summed Euclidean distance to the models, each tensor one point:
    Weiszfeld's algorithm (Weiszfeld 1937; as the robust aggregate of Pillutla et al. 2022,
    arXiv:1912.13445), started from the mean.
    """
    points = torch.stack(list(models))
    estimate = points.mean(dim=0)
    for _ in range(MEDIAN_MAX_STEPS):
        distances = (points - estimate).reshape(len(points), -1).norm(dim=1).clamp(min=MEDIAN_EPS)
        weights = (1 / distances).reshape(-1, *([1] * estimate.dim()))
        updated = (weights * points).sum(dim=0) / weights.sum()
        moved = (updated - estimate).norm()
        estimate = updated
        if moved <= MEDIAN_TOLERANCE * estimate.norm():
            break
    return estimate


def perpendicular_part(direction: Tensor, vector: Tensor) -> Tensor:
    """``vector`` minus its projection on ``direction`` (Gram–Schmidt); all of it when direction is 0.

    A direction so small that its squared norm underflows (denormals) is scaled to a max-abs of 1
    first (the projection does not depend on its length), rather than taken as 0 or divided by 0.
    """
    norm_sq = (direction * direction).sum()
    if not norm_sq > 0 or not torch.isfinite(norm_sq):
        scale = direction.abs().max()
        if scale == 0:
            return vector
        direction = direction / scale
        norm_sq = (direction * direction).sum()
    return vector - direction * ((direction * vector).sum() / norm_sq)


# Registered methods (A, B, C as the recipe gives them) ----------------------------------

@merge_method("slerp", label="SLERP", formula="sin((1−α)Ω)/sin Ω·A + sin(αΩ)/sin Ω·B, Ω the angle between A and B")
def slerp(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH)
    between A and B as whole tensors; lerp where they are (anti)parallel or one is zero.
    """
    if alpha == 0:
        return a
    norms = a.norm() * b.norm()
    dot = float((a * b).sum() / norms) if norms > 0 else 1.0
    if abs(dot) > SLERP_PARALLEL_DOT:
        return torch.lerp(a, b, alpha)
    omega = math.acos(dot)
    return (math.sin((1 - alpha) * omega) * a + math.sin(alpha * omega) * b) / math.sin(omega)


@merge_method("ties", label="TIES", bounds=DENSITY,
              formula="A + α·disjoint mean of the top-β magnitudes of B − A and C − A, signs elected")
def ties_merge(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float, beta: float) -> Tensor:
    """TIES with base A and fine-tunes B, C (and D, E… from ``more_models``); β is the density."""
    return ties(a, (b, c, *more), alpha=alpha, density=beta)


@merge_method("dare", label="DARE", bounds=DENSITY,
              formula="A + α·(drop(B − A) + drop(C − A)), each entry kept with chance β and divided by β")
def dare_merge(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float, beta: float, seed: int,
               key: str) -> Tensor:
    """DARE with base A and fine-tunes B, C (D, E…); β is the density; drops drawn per key from ``seed``."""
    return dare(a, (b, c, *more), alpha=alpha, density=beta, generator=_seeded(seed, key))


@merge_method("dare_ties", label="DARE-TIES", bounds=DENSITY,
              formula="A + α·disjoint mean of drop(B − A) and drop(C − A), signs elected")
def dare_ties_merge(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float, beta: float, seed: int,
                    key: str) -> Tensor:
    """DARE-TIES with base A and fine-tunes B, C (D, E…); β is the density; drops drawn per key from ``seed``."""
    return dare_ties(a, (b, c, *more), alpha=alpha, density=beta, generator=_seeded(seed, key))


@merge_method("model_breadcrumbs", label="Model Breadcrumbs", bounds=DENSITY + (("gamma", 0.0, 1.0),),
              formula="A + α·Σ (B − A, C − A) without their top-γ and bottom magnitudes, β kept")
def breadcrumbs_merge(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float, beta: float,
                      gamma: float) -> Tensor:
    """Model Breadcrumbs with base A and fine-tunes B, C (D, E…); β the density kept, γ the top fraction dropped."""
    return breadcrumbs(a, (b, c, *more), alpha=alpha, density=beta, drop_top=gamma)


@merge_method("model_stock", label="Model Stock", formula="A + α·t·((B + C)/2 − A), t = 2cos θ/(1 + cos θ)")
def model_stock_merge(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float) -> Tensor:
    """Model Stock with base A and fine-tunes B, C (D, E…); α = 1 is the paper's merge."""
    return model_stock(a, (b, c, *more), alpha=alpha)


@merge_method("geometric_median", label="Geometric median", formula="lerp(A, geometric median of A, B, C, α)")
def geometric_median_merge(a: Tensor, b: Tensor, c: Tensor, *more: Tensor, alpha: float) -> Tensor:
    """The geometric median of A, B, C (and D, E…) at α = 1, or that far from A toward it."""
    if alpha == 0:
        return a
    return torch.lerp(a, geometric_median((a, b, c, *more)), alpha)


@merge_method("add_perpendicular", label="Add perpendicular", formula="A + α·(the part of B − C perpendicular to A − C)")
def add_perpendicular(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """Add difference with only what B − C adds beyond A's own direction from C (sd-mecha's
    ``add_perpendicular``, ljleb 2023; a Gram–Schmidt step), so A's change is not counted twice.
    """
    return a + alpha * perpendicular_part(a - c, b - c)
