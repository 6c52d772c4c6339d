"""Rotary position embedding in the rotate_half (NeoX) layout, with one frequency table per attention type."""

from __future__ import annotations

import torch
from torch import nn

from g3n_export.model.casts import to_dtype, to_float32


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the halves (x1, x2) of the last dimension to (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """Return the `[head_dim, head_dim]` signed permutation `R` with `linear(x, R) == rotate_half(x)`.

    `apply_rotary` multiplies by it because XNNPACK (ExecuTorch 1.5.1) does not delegate slicing a tensor with a
    dynamic sequence length. Each output sums one input lane and exact zeros, so the result equals `rotate_half`.
    """
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim)
    for k in range(half):
        rotation[k, k + half] = -1.0
        rotation[k + half, k] = 1.0
    return rotation


class RotaryEmbedding(nn.Module):
    """cos/sin tables for integer positions, computed from `inv_freq = theta^(-2i/head_dim)`.

    The tables are computed per call from the positions rather than read from a precomputed `[max_seq_len, dim]`
    buffer, so the same module serves any position without a size limit, and the float32 arithmetic is the same
    as transformers' (`position * inv_freq`, then cos and sin).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def reset_buffers(self) -> None:
        """Recompute `inv_freq` (after the module was built on the meta device)."""
        self.inv_freq = self._inv_freq()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each float32 `[T, head_dim]`, for int64 `positions` `[T]`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # shape: [T, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # shape: [T, head_dim]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, heads, head_dim]` by the angles of its T positions, given `rotate_half_matrix(head_dim)`."""
    cos = to_dtype(cos.view(1, -1, 1, cos.shape[-1]), x.dtype)
    sin = to_dtype(sin.view(1, -1, 1, sin.shape[-1]), x.dtype)
    # The float32 round trip is exact: the rotation only moves lanes and flips signs.
    rotated = to_dtype(nn.functional.linear(to_float32(x), rotation), x.dtype)
    return x * cos + rotated * sin
