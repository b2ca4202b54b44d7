"""The original SuperMerger's four merge modes with calculation mode "normal".

Formulas and the way each is computed (lerp, precision) follow the original's
``smerge`` (hako-mikan/sd-webui-supermerger, scripts/mergers/mergers.py
l.497–539) so that our numbers equal its numbers.
"""

from typing import Optional

import torch
from torch import Tensor

from mergers.methods.registry import merge_method


# torch's lerp computes fp16/bf16 in fp32 and rounds once, so "native" equals the
# original's fp32 lerp bit for bit without fp32 copies of the inputs.
@merge_method("weight_sum", elementwise=True, label="Weight sum", precision="native", formula="A·(1−α) + B·α")
def weight_sum(a: Tensor, b: Tensor, *, alpha: float, out: Optional[Tensor] = None) -> Tensor:
    """A·(1−α) + B·α, as ``lerp`` (α = 1 gives B exactly, α = 0 gives A); ``out``: a reused buffer."""
    return torch.lerp(a, b, alpha, out=out)


@merge_method("add_difference", elementwise=True, label="Add difference", precision="native", formula="A + (B − C)·α")
def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, out: Optional[Tensor] = None) -> Tensor:
    """A + α·(B − C), in the models' own dtype as the original computes it (the same three roundings,
    in place in ``out`` when given)."""
    return torch.sub(b, c, out=out).mul_(alpha).add_(a)


@merge_method("triple_sum", elementwise=True, label="Triple sum", precision="native", formula="A·(1−α−β) + B·α + C·β")
def triple_sum(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """A·(1−α−β) + B·α + C·β, as lerp(A, lerp(B, C, β/(α+β)), α+β) when α+β ≠ 0."""
    total = alpha + beta
    if total == 0:
        return a.clone()
    return torch.lerp(a, torch.lerp(b, c, beta / total), total)


@merge_method("sum_twice", elementwise=True, label="sum Twice", formula="(A·(1−α) + B·α)·(1−β) + C·β")
def sum_twice(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """(A·(1−α) + B·α)·(1−β) + C·β, as two lerps in fp32."""
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)
