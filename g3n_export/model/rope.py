"""Rotary position embedding in the rotate_half (NeoX) layout, with one frequency table per attention type."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the halves (x1, x2) of the last dimension to (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, heads, head_dim]` by the angles of its T positions."""
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin
