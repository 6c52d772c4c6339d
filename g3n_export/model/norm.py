"""RMSNorm as Gemma 3n defines it: the weight multiplies directly (not `1 + weight` as in Gemma 2 and 3)."""

from __future__ import annotations

import torch
from torch import nn


def last_dim_mean(x: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """Return the mean over the last dimension of float32 `x`, keeping it, given float32 `ones` `[1, x.shape[-1]]`.

    The sum is a linear layer with a constant all-ones weight because ExecuTorch's XNNPACK partitioner (1.5.1) delegates
    `linear` at any rank and sequence length, but `mean.dim` only over dims [2, 3] of a 4-D tensor.
    """
    return nn.functional.linear(x, ones) / ones.shape[-1]


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x²) + eps) * weight` over the last dimension, reduced in float32 and cast back.

    `rsqrt` and the all-ones linear (see `last_dim_mean`) keep the norm inside one XNNPACK partition. They differ from
    transformers' `pow(mean(x²) + eps, -0.5)` by float32 rounding only.

    Args:
        dim: size of the normalized (last) dimension.
        eps: added to the mean square before the inverse square root.
        with_scale: False for the weightless norm that Gemma 3n applies to attention values.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, with_scale: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.register_buffer("ones", torch.ones(1, dim), persistent=False)

    def reset_buffers(self) -> None:
        """Rebuild the all-ones row (after the module was built on the meta device)."""
        self.ones = torch.ones(1, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 island: x² overflows float16 for |x| > 256.
        x32 = x.float()
        normed = x32 * torch.rsqrt(last_dim_mean(x32 * x32, self.ones) + self.eps)
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
