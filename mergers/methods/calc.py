"""The original SuperMerger's calculation modes other than "normal".

Each formula restates the original's (hako-mikan/sd-webui-supermerger,
scripts/mergers/mergers.py, read at 0b1c491; line numbers below) and is
computed the way it computes it, so shared recipes give the same weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mergers.methods.filters import smooth
from mergers.methods.registry import merge_method

# "self" and "plus random" leave these alone (the original's SELFKEYS).
SELF_SKIP = ("to_out", "proj_out", "norm")
# cosine modes skip the VAE "to get better results" (the original's comment).
VAE_SKIP = ("first_stage_model",)


# cosineA / cosineB -------------------------------------------------------------

@dataclass(frozen=True)
class CosineStats:
    """The whole-model similarity range cosineA/B scale by (``precosine``, l.705).

    Every key holding "model" that B has, VAE excluded, contributes its per-column
    similarities; NaNs (and infinities) are dropped, then values under the 1st percentile, then,
    of what is left, values over the 99th ("midpoint" percentiles, as numpy's).
    ``combined``: score each key as stage 1 does (the corrected variant); the
    original's cosineA scores its statistics with the plain cosine only.
    """

    normalise: bool
    combined: bool

    def wants(self, key: str) -> bool:
        return "model" in key and not any(part in key for part in VAE_SKIP)

    def collect(self, a: Tensor, b: Tensor):
        a, b = a.float(), b.float()
        if self.normalise:
            a, b = F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)
        # The original's scores, NaN for all-zero keys included (reduce drops them as it does), so the
        # model-wide range is the original's; only the merge's scores are defined everywhere.
        score = _combined_similarity(a, b, defined=False) if self.combined else F.cosine_similarity(a, b, dim=0)
        return score.detach().cpu().numpy().astype(np.float32).reshape(-1)

    def reduce(self, collected: list) -> dict[str, float]:
        sims = np.concatenate(collected).astype(np.float64) if collected else np.zeros(0)
        # NaN dropped as the original drops it; ±Inf too (denormal norms: x/0), which broke its percentiles.
        sims = sims[np.isfinite(sims)]
        if sims.size == 0:
            return {"sims_min": 0.0, "sims_max": 1.0}
        sims = sims[sims >= np.percentile(sims, 1, method="midpoint")]
        sims = sims[sims <= np.percentile(sims, 99, method="midpoint")]
        return {"sims_min": float(sims.min()), "sims_max": float(sims.max())}


def _combined_similarity(a: Tensor, b: Tensor, *, defined: bool = True) -> Tensor:
    """(per-column cosine along dim 0 + whole-tensor cosine) / 2, as ``cosine`` (l.739) scores a key.

    ``defined``: the whole-tensor cosine of :func:`tensor_cosine` (the original's is 0/0 = NaN for
    all-zero or underflowing tensors, and its NaN went into the merged key)."""
    column = F.cosine_similarity(a, b, dim=0)
    if defined:
        return (column + tensor_cosine(a, b)) / 2.0
    whole = torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.norm(a) * torch.norm(b))
    return (column + whole) / 2.0


# fp32 rounding takes a true cosine of ±1 a few ulps past it; further out, the norms underflowed.
COSINE_SLACK = 1.0 + 1e-4


def tensor_cosine(a: Tensor, b: Tensor) -> Tensor:
    """The cosine similarity of two whole tensors, finite for any finite inputs.

    As the original computes it where that is a cosine (finite, |cos| ≤ 1 give or take rounding; same
    bits); else: two all-zero tensors are identical (1), one all-zero tensor has nothing in common with
    the other (0), and tensors so small that their squares underflow (denormals, where the original
    divides by 0 or by a rounded-away norm) are scaled to a max-abs of 1 first (cosine ignores scale).

    Example:
        >>> tiny = torch.full((3,), 1e-40)
        >>> tensor_cosine(torch.zeros(3), torch.zeros(3)).item(), tensor_cosine(tiny, -tiny).item()
        (1.0, -1.0)
    """
    cosine = torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.norm(a) * torch.norm(b))
    if bool(torch.isfinite(cosine) & (cosine.abs() <= COSINE_SLACK)):
        return cosine
    scale_a, scale_b = a.abs().max(), b.abs().max()
    if scale_a == 0 or scale_b == 0:
        return torch.ones_like(cosine) if scale_a == scale_b else torch.zeros_like(cosine)
    a, b = a / scale_a, b / scale_b
    return (torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.norm(a) * torch.norm(b))).clamp(-1.0, 1.0)


def _cosine_merge(a: Tensor, b: Tensor, score: Tensor, alpha: float, sims_min: float, sims_max: float) -> Tensor:
    span = sims_max - sims_min
    # Every key as alike as every other (the range is one value): all at the top of it, not 0/0 = NaN.
    scaled = (score - sims_min) / span if span > 0 else torch.ones_like(score)
    k = (scaled - alpha).clip(min=0, max=1.0)
    return torch.lerp(b, a, k)


@merge_method("cosine_a", label="cosineA", skip_keys=VAE_SKIP, prepass=CosineStats(normalise=True, combined=False),
              formula="lerp(B, A, k): k from A's and B's normalised cosine similarity, minus |α|")
def cosine_a(a: Tensor, b: Tensor, *, alpha: float, sims_min: float, sims_max: float) -> Tensor:
    """cosineA (l.739): favours A's structure; k per column, scaled by the model-wide range, minus |α|."""
    a_n, b_n = F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)
    return _cosine_merge(a, b, _combined_similarity(a_n, b_n), abs(alpha), sims_min, sims_max)


@merge_method("cosine_a_consistent", label="cosineA consistent", skip_keys=VAE_SKIP,
              prepass=CosineStats(normalise=True, combined=True),
              formula="cosineA with its statistics scored like its merge")
def cosine_a_consistent(a: Tensor, b: Tensor, *, alpha: float, sims_min: float, sims_max: float) -> Tensor:
    """cosineA with the original's quirk fixed: the model-wide range uses the same combined score as each key."""
    return cosine_a(a, b, alpha=alpha, sims_min=sims_min, sims_max=sims_max)


@merge_method("cosine_b", label="cosineB", skip_keys=VAE_SKIP, prepass=CosineStats(normalise=False, combined=True),
              formula="lerp(B, A, k): k from A's and B's cosine similarity, minus α")
def cosine_b(a: Tensor, b: Tensor, *, alpha: float, sims_min: float, sims_max: float) -> Tensor:
    """cosineB (l.757): as cosineA on the raw tensors, minus α (not |α|)."""
    return _cosine_merge(a, b, _combined_similarity(a, b), alpha, sims_min, sims_max)


# Add-difference family ------------------------------------------------------------

@merge_method("train_difference", label="trainDifference", formula="A + 1.8·α·(B − C)·|B − A| / (|B − C| + |B − A|)")
def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """trainDifference (``traindiff``, l.777): B − C scaled by how far B is from A; keys where B == C stay A."""
    if torch.equal(b, c):
        return a
    diff = b - c
    distance_bc, distance_ba = diff.abs(), (b - a).abs()
    total = distance_bc + distance_ba
    scale = torch.where(total != 0, distance_ba / total, torch.zeros((), dtype=a.dtype, device=a.device))
    return a + torch.sign(diff) * scale.abs() * distance_bc * (alpha * 1.8)


@merge_method("smooth_add", label="smoothAdd", formula="A + α·gaussian(median(B − C))")
def smooth_add(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """smoothAdd (l.569): B − C through a size-3 median then a σ=1 gaussian filter, over all dims."""
    return a + alpha * smooth(b - c)


@merge_method("extract", label="extract", bounds=(("alpha", 0.0, 1.0), ("beta", 0.0, 1.0), ("gamma", 0.0, math.inf)),
              formula="A + lerp(B − A, C − A, α)·lerp(d, 1 − d, β), d = ((cos + 1)/2)^γ")
def extract(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float, gamma: float) -> Tensor:
    """extract (``extract_super``, l.795): features of B − A and C − A, similar (β=0) or dissimilar (β=1)."""
    from_b, from_c = b - a, c - a
    cos = F.cosine_similarity(from_b, from_c, dim=-1).clamp(-1, 1).unsqueeze(-1)
    d = ((cos + 1) / 2) ** gamma
    return a + torch.lerp(from_b, from_c, alpha) * torch.lerp(d, 1 - d, beta)


# Slices and single-model modes --------------------------------------------------------

def _swap_slices(a: Tensor, b: Tensor, alpha: float, beta: float, *, axis: int, length: int) -> Tensor:
    """The ``tensormerge`` rule (l.822): B's slice [Nβ, N(α+β)) into A, or, past 1, A's slice into B."""
    if alpha + beta <= 1:
        start, end, base, source = int(length * beta), int(length * (alpha + beta)), a, b
    else:
        start, end, base, source = int(length * (alpha + beta - 1)), int(length * beta), b, a
    out = base.clone()
    index = (slice(None),) * axis + (slice(start, end),)
    out[index] = source[index]
    return out


@merge_method("tensor", label="tensor", precision="native", formula="rows [Nβ, N(α+β)) of A swapped for B's")
def tensor_swap(a: Tensor, b: Tensor, *, alpha: float, beta: float) -> Tensor:
    """tensor (l.822): whole rows (dim 0) are taken from B instead of interpolated."""
    if a.dim() == 0:
        return a
    return _swap_slices(a, b, alpha, beta, axis=0, length=a.shape[0])


@merge_method("tensor2", label="tensor2", precision="native", formula="columns [Nβ, N(α+β)) of A swapped for B's")
def tensor2_swap(a: Tensor, b: Tensor, *, alpha: float, beta: float) -> Tensor:
    """tensor2 (l.858): as tensor along dim 1; N is shape[1] when that exceeds 100, else shape[0] (sic)."""
    if a.dim() == 0:
        return a
    if a.dim() == 1:
        return _swap_slices(a, b, alpha, beta, axis=0, length=a.shape[0])
    length = a.shape[1] if a.shape[1] > 100 else a.shape[0]
    return _swap_slices(a, b, alpha, beta, axis=1, length=length)


@merge_method("self", label="self", precision="native", skip_keys=SELF_SKIP, formula="A·α (α = 0 keeps A)")
def self_scale(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """self (l.585): A scaled by α, except attention outputs and norms; B is required but unused."""
    return a if alpha == 0 else a * alpha


@merge_method("plus_random", label="plus random", skip_keys=SELF_SKIP, formula="A + α·N(0, 1)")
def plus_random(a: Tensor, b: Tensor, *, alpha: float, seed: int, key: str) -> Tensor:
    """plus random (l.590): A plus α·standard normal noise, drawn per key from ``seed`` (reproducible)."""
    if alpha == 0:
        return a
    generator = torch.Generator().manual_seed(key_seed(seed, key))
    noise = torch.randn(a.shape, generator=generator, dtype=torch.float32)
    return a + alpha * noise.to(device=a.device, dtype=a.dtype)


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one key, the same on every device and in every key order.

    Example:
        >>> key_seed(1, "model.diffusion_model.out.2.weight") == key_seed(1, "model.diffusion_model.out.2.weight")
        True
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
