"""scipy.ndimage's median and gaussian filters, in torch so they run on the GPU too.

smoothAdd filters B − C with ``median_filter(size=3)`` then ``gaussian_filter(sigma=1)``
over every dimension, with scipy's defaults (mode "reflect", truncate 4). These
functions give the same numbers to float tolerance (tests compare with scipy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Medians gather 3**ndim values per element; bound the gathered copy per chunk.
MEDIAN_CHUNK_VALUES = 32 * 1024 * 1024


def reflect_indices(size: int, pad: int, device=None) -> Tensor:
    """Indices of scipy's "reflect" extension (d c b a | a b c d | d c b a), for any pad.

    Example:
        >>> reflect_indices(3, 2).tolist()
        [1, 0, 0, 1, 2, 2, 1]
    """
    index = torch.arange(-pad, size + pad, device=device).remainder(2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """``x`` extended by ``pad`` on both sides of every dimension, scipy-"reflect" style."""
    for dim in range(x.dim()):
        x = x.index_select(dim, reflect_indices(x.shape[dim], pad, x.device))
    return x


def median_filter3(x: Tensor) -> Tensor:
    """scipy.ndimage.median_filter(x, size=3): the median of each 3×…×3 neighbourhood.

    Example:
        >>> median_filter3(torch.tensor([1.0, 9.0, 2.0])).tolist()
        [1.0, 2.0, 2.0]
    """
    if x.dim() == 0:
        return x.clone()
    padded = reflect_pad(x, 1)
    window = 3 ** x.dim()
    rows_per_chunk = max(1, MEDIAN_CHUNK_VALUES // (window * max(1, x[0].numel())))
    chunks = [_median_rows(padded, start, min(start + rows_per_chunk, x.shape[0]))
              for start in range(0, x.shape[0], rows_per_chunk)]
    return torch.cat(chunks)


def _median_rows(padded: Tensor, start: int, end: int) -> Tensor:
    windows = padded[start:end + 2]
    for dim in range(padded.dim()):
        windows = windows.unfold(dim, 3, 1)
    flat = windows.reshape(*windows.shape[: padded.dim()], -1)
    return flat.median(dim=-1).values


def gaussian_kernel(sigma: float = 1.0, truncate: float = 4.0, *, dtype=torch.float32, device=None) -> Tensor:
    """scipy's 1-D gaussian weights: radius int(truncate·σ + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def gaussian_filter(x: Tensor, sigma: float = 1.0, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage.gaussian_filter(x, sigma): one 1-D pass per dimension, in order.

    Example:
        >>> gaussian_filter(torch.ones(5)).tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    kernel = gaussian_kernel(sigma, truncate, dtype=x.dtype, device=x.device)
    for dim in range(x.dim()):
        x = _correlate1d(x, kernel, dim)
    return x


def _correlate1d(x: Tensor, kernel: Tensor, dim: int) -> Tensor:
    radius = (kernel.numel() - 1) // 2
    moved = x.movedim(dim, -1)
    size = moved.shape[-1]
    lines = moved.reshape(-1, 1, size).index_select(-1, reflect_indices(size, radius, x.device))
    filtered = F.conv1d(lines, kernel.view(1, 1, -1))
    return filtered.reshape(moved.shape).movedim(-1, dim)


def smooth(x: Tensor) -> Tensor:
    """The smoothAdd filter: gaussian(σ=1) of median(size 3), over all dimensions."""
    return gaussian_filter(median_filter3(x), 1.0)


