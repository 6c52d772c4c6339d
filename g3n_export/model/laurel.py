"""LAuReL (learned augmented residual): a rank-r linear branch added to its own input."""

from __future__ import annotations

import torch
from torch import nn

from g3n_export.model.norm import RMSNorm


class Laurel(nn.Module):
    """`x + post_laurel_norm(linear_right(linear_left(x)))`, with `linear_left` projecting to `rank`."""

    def __init__(self, hidden_size: int, rank: int, eps: float) -> None:
        super().__init__()
        self.linear_left = nn.Linear(hidden_size, rank, bias=False)
        self.linear_right = nn.Linear(rank, hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))
