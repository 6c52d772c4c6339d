"""Gated GELU feed-forward with Gemma 3n's Gaussian top-k activation sparsity."""

from __future__ import annotations

import torch
from torch import nn

from g3n_export.model.casts import to_dtype, to_float32
from g3n_export.model.norm import last_dim_mean


class MLP(nn.Module):
    """`down(gelu_tanh(sparsify(gate(x))) * up(x))` with a per-layer FFN width.

    Args:
        hidden_size: model width.
        intermediate_size: FFN width of this layer (MatFormer slices use different widths per layer).
        sparsity_z: standard-normal quantile of the layer's target sparsity (1.6448536 for 0.95), or None for a dense
            layer. It is a Python float so that no `erfinv` reaches a traced graph.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, sparsity_z: float | None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.sparsity_z = sparsity_z
        self.intermediate_size = intermediate_size
        # Two copies of the all-ones row: XNNPACK's partitioner groups linears that share a weight, and grouping the
        # mean with the variance that depends on it can form a dependency cycle.
        self.register_buffer("ones_mean", torch.ones(1, intermediate_size), persistent=False)
        self.register_buffer("ones_variance", torch.ones(1, intermediate_size), persistent=False)

    def reset_buffers(self) -> None:
        """Rebuild the all-ones rows (after the module was built on the meta device)."""
        self.ones_mean = torch.ones(1, self.intermediate_size)
        self.ones_variance = torch.ones(1, self.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)  # shape: [B, T, F]
        if self.sparsity_z is not None:
            gate = self._gaussian_top_k(gate)
        hidden = nn.functional.gelu(gate, approximate="tanh") * self.up_proj(x)
        return self.down_proj(hidden)

    def _gaussian_top_k(self, gate: torch.Tensor) -> torch.Tensor:
        # Keep the lanes above mean + z * std of each token, assuming the lanes are Gaussian. The statistics use the
        # population std and run in float32, because a half-precision variance over 16k lanes can overflow. The std is
        # written out as sqrt(mean((x - mean)²)), so that XNNPACK delegates it (see `last_dim_mean`).
        # NOTE: z stays a float32 constant here, while transformers 5.25 rounds it to the activation dtype (1.6484375 in bfloat16).
        gate32 = to_float32(gate)
        mean = last_dim_mean(gate32, self.ones_mean)
        centered = gate32 - mean
        std = torch.sqrt(last_dim_mean(centered * centered, self.ones_variance))
        cutoff = mean + std * self.sparsity_z
        return to_dtype(nn.functional.relu(gate32 - cutoff), gate.dtype)
