"""Per-tensor statistics of two (or three) models, from a few running sums.

Everything a comparison reports comes from sums over the elements: ‖A‖², ‖B‖², A·B and ‖A−B‖²
(:class:`PairSums`), and for a merge M of A and B, (M−A)·(B−A), ‖B−A‖² and ‖M−A‖² (:class:`FitSums`).
Sums add up, so a block's or a component's figure is the sum of its keys' sums, and a tensor is
summed in chunks: float32 per chunk of 32 Ki elements, the chunks' sums added in float64, so a
38 M-element embedding costs a few hundred KB beyond its own bytes.

Example:
    >>> sums = pair_sums(torch.ones(3), -torch.ones(3))
    >>> sums.cosine, sums.relative_l2
    (-1.0, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# torch's GRAIN_SIZE (32 Ki elements): ops this small run on the calling thread. Bigger chunks (and
# BLAS dot) hand work to OpenMP/MKL threads, which on a busy 2-core machine spun and ran 10-50x
# slower; this way the 38 M-element SD1.5 embedding takes ~0.3 s, and the 128 KB operands stay in cache.
CHUNK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class PairSums:
    """Sums over the elements of A and B: enough for their cosine, norms and relative distance."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0  # ‖A − B‖², summed directly: aa + bb − 2ab cancels for near-identical tensors
    count: int = 0

    def __add__(self, other: PairSums) -> PairSums:
        return PairSums(self.aa + other.aa, self.bb + other.bb, self.ab + other.ab, self.dd + other.dd,
                        self.count + other.count)

    @property
    def cosine(self) -> float:
        """A·B / (‖A‖‖B‖): 1 alike, 0 unrelated, −1 opposite. Identical (even all-zero) tensors give 1."""
        if self.dd == 0.0:
            return 1.0
        if self.aa == 0.0 or self.bb == 0.0:
            return 0.0  # as torch's cosine_similarity (the original's) gives against a zero vector
        return max(-1.0, min(1.0, self.ab / (math.sqrt(self.aa) * math.sqrt(self.bb))))

    @property
    def relative_l2(self) -> float:
        """‖A − B‖ / max(‖A‖, ‖B‖): 0 identical, 2 negated; symmetric and always finite."""
        largest = max(self.aa, self.bb)
        return math.sqrt(self.dd / largest) if largest > 0.0 else 0.0

    @property
    def norm_a(self) -> float:
        return math.sqrt(self.aa)

    @property
    def norm_b(self) -> float:
        return math.sqrt(self.bb)


@dataclass(frozen=True)
class FitSums:
    """Sums for fitting M − A ≈ t·(B − A): how much of B a merge M of A holds."""

    xy: float = 0.0  # (M − A)·(B − A)
    yy: float = 0.0  # ‖B − A‖²
    xx: float = 0.0  # ‖M − A‖²

    def __add__(self, other: FitSums) -> FitSums:
        return FitSums(self.xy + other.xy, self.yy + other.yy, self.xx + other.xx)

    @property
    def coefficient(self) -> float | None:
        """The least-squares t of M − A onto B − A (a weight sum at alpha 0.3 gives 0.3); None where B = A."""
        return self.xy / self.yy if self.yy > 0.0 else None

    @property
    def alignment(self) -> float | None:
        """cos(M − A, B − A): 1 when M lies on the line from A to B; None where M = A or B = A."""
        if self.xx == 0.0 or self.yy == 0.0:
            return None
        return max(-1.0, min(1.0, self.xy / (math.sqrt(self.xx) * math.sqrt(self.yy))))


def pair_sums(a: Tensor, b: Tensor) -> PairSums:
    """The :class:`PairSums` of two tensors of the same shape, any float dtype.

    Example:
        >>> pair_sums(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).cosine
        0.0
    """
    aa = bb = ab = dd = 0.0
    for x, y in _chunks(a, b):
        d = x - y
        aa, bb = aa + _dot(x, x), bb + _dot(y, y)
        ab, dd = ab + _dot(x, y), dd + _dot(d, d)
    return PairSums(aa, bb, ab, dd, a.numel())


def fit_sums(a: Tensor, b: Tensor, merged: Tensor) -> FitSums:
    """The :class:`FitSums` of a merge ``merged`` of ``a`` and ``b`` (all of one shape).

    Example:
        >>> round(fit_sums(torch.zeros(2), torch.ones(2), torch.full((2,), 0.3)).coefficient, 6)
        0.3
    """
    xy = yy = xx = 0.0
    for x_a, x_b, x_m in _chunks(a, b, merged):
        x, y = x_m - x_a, x_b - x_a
        xy, yy, xx = xy + _dot(x, y), yy + _dot(y, y), xx + _dot(x, x)
    return FitSums(xy, yy, xx)


def _chunks(*tensors: Tensor):
    """Matching float32 slices of the flattened tensors, CHUNK_ELEMENTS at a time."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK_ELEMENTS):
        yield [t[start:start + CHUNK_ELEMENTS].to(torch.float32) for t in flat]


def _dot(x: Tensor, y: Tensor) -> float:
    return float((x * y).sum())  # torch's cascaded float32 sum: more exact than a BLAS dot, and not threaded
