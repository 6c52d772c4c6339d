"""RMSNorm as Gemma 3n defines it: the weight multiplies directly (not `1 + weight` as in Gemma 2 and 3)."""

from __future__ import annotations

import torch
from torch import nn

from g3n_export.model.casts import to_dtype, to_float32


def last_dim_mean(x: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """Return the mean over the last dimension of float32 `x`, keeping it, given float32 `ones` `[1, x.shape[-1]]`.

    The sum is a linear layer with a constant all-ones weight because ExecuTorch's XNNPACK partitioner (1.5.1) delegates
    `linear` at any rank and sequence length, but `mean.dim` only over dims [2, 3] of a 4-D tensor.
    """
    return nn.functional.linear(x, ones) / ones.shape[-1]


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x²) + eps) * weight` over the last dimension, reduced in float32 and cast back.

    `rsqrt` and a linear against a constant row of `1/dim` (see `last_dim_mean`) keep the norm inside one XNNPACK
    partition. They differ from transformers' `pow(mean(x²) + eps, -0.5)` by float32 rounding only, and for the
    power-of-two widths of Gemma 3n (head, hidden and PLE widths) multiplying by `1/dim` is exact.

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
        self.register_buffer("averaging_row", self._averaging_row(), persistent=False)

    def _averaging_row(self) -> torch.Tensor:
        return torch.full((1, self.dim), 1.0 / self.dim)

    def reset_buffers(self) -> None:
        """Rebuild the averaging row (after the module was built on the meta device)."""
        self.averaging_row = self._averaging_row()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 island: x² overflows float16 for |x| > 256.
        x32 = to_float32(x)
        if x.dim() == 4:
            # Per-head and per-layer norms run on a 3-D view: XNNPACK delegates a 3-D linear whole, while a 4-D one
            # is decomposed into reshapes with a symbolic sequence length that stay outside the delegate.
            x32 = x32.reshape(x.shape[0], -1, self.dim)
        # One linear computes the mean: a separate division would be one more node in every norm of the graph.
        normed = x32 * torch.rsqrt(nn.functional.linear(x32 * x32, self.averaging_row) + self.eps)
        if self.weight is not None:
            normed = normed * to_float32(self.weight)
        if x.dim() == 4:
            normed = normed.view(x.shape[0], -1, x.shape[2], self.dim)
        return to_dtype(normed, x.dtype)


def rms_magnitude(x: torch.Tensor, *, min_mean_square: float | None = None) -> torch.Tensor:
    """Return `sqrt(mean(x²))` over the last dimension in float32, keeping the dimension.

    Args:
        x: any tensor.
        min_mean_square: lower clamp of the mean square before the square root, to avoid dividing by zero.
    """
    mean_square = to_float32(x).pow(2).mean(-1, keepdim=True)
    if min_mean_square is not None:
        mean_square = mean_square.clamp(min=min_mean_square)
    return torch.sqrt(mean_square)
