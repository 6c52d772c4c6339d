"""RMSNorm as Gemma 3n defines it: the weight multiplies directly (not `1 + weight` as in Gemma 2 and 3)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`x * (mean(x²) + eps)^-0.5 * weight` over the last dimension, reduced in float32 and cast back.

    `torch.pow(ms, -0.5)` rather than `rsqrt` matches transformers' Gemma 3n norm to the last bit in float32.

    Args:
        dim: size of the normalized (last) dimension.
        eps: added to the mean square before the inverse square root.
        with_scale: False for the weightless norm that Gemma 3n applies to attention values.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 island: x² overflows float16 for |x| > 256.
        x32 = x.float()
        normed = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            normed = normed * self.weight.float()
        return normed.type_as(x)


def rms_magnitude(x: torch.Tensor, *, min_mean_square: float | None = None) -> torch.Tensor:
    """Return `sqrt(mean(x²))` over the last dimension in float32, keeping the dimension.

    Args:
        x: any tensor.
        min_mean_square: lower clamp of the mean square before the square root, to avoid dividing by zero.
    """
    mean_square = x.float().pow(2).mean(-1, keepdim=True)
    if min_mean_square is not None:
        mean_square = mean_square.clamp(min=min_mean_square)
    return torch.sqrt(mean_square)
