"""Gemma 3n self-attention: q/k/v norms, RoPE, scale 1.0, optional sliding window, grouped-query KV, KV sharing.

Shape notation: B batch, T new tokens, S key slots, H query heads, H_kv key/value heads, D head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from g3n_export.config import TextConfig
from g3n_export.model.casts import to_dtype, to_float32
from g3n_export.model.kv_cache import KeyValues, KVStrategy, attention_mask
from g3n_export.model.norm import RMSNorm
from g3n_export.model.rope import apply_rotary, rotate_half_matrix


class Attention(nn.Module):
    """Self-attention of one decoder layer.

    A KV-owning layer projects its own keys and values and stores them through the KV strategy. A KV-shared layer has
    no k/v projections at all: it projects only queries (RoPE at the true positions) and attends to the `KeyValues`
    its producer returned earlier in the same forward pass, i.e. the producer's cache after this call's update.
    """

    def __init__(self, config: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window if config.is_sliding(layer) else None
        self.is_kv_shared = config.is_kv_shared(layer)
        eps = config.rms_norm_eps
        d = config.hidden_size

        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        if not self.is_kv_shared:
            self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, eps)
            self.v_norm = RMSNorm(self.head_dim, eps, with_scale=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        # Queries and keys get their own copy of the rotate_half matrix: XNNPACK's partitioner groups linears that
        # share a weight, and the key path leaves the delegate (KV cache update) before it meets the queries again.
        self.register_buffer("rotation_q", rotate_half_matrix(self.head_dim), persistent=False)
        self.register_buffer("rotation_k", rotate_half_matrix(self.head_dim), persistent=False)

    def reset_buffers(self) -> None:
        """Rebuild the rotate_half matrices (after the module was built on the meta device)."""
        self.rotation_q = rotate_half_matrix(self.head_dim)
        self.rotation_k = rotate_half_matrix(self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        kv: KVStrategy,
        shared: KeyValues | None = None,
    ) -> tuple[torch.Tensor, KeyValues]:
        """Attend from the normed hidden states `x` `[B, T, d]`.

        Args:
            x: input of the attention block.
            rope: (cos, sin) `[T, D]` for this layer's attention type.
            positions: int64 `[T]`, the absolute position of each new token.
            kv: where a KV-owning layer stores its keys and values.
            shared: the producer's `KeyValues`, required for a KV-shared layer and ignored otherwise.

        Returns:
            The output `[B, T, d]` and the `KeyValues` attended to (for the layers that share this layer's K/V).
        """
        b = x.shape[0]
        cos, sin = rope

        # Reshapes infer the sequence length (-1): XNNPACK (ExecuTorch 1.5.1) delegates a reshape whose sizes are
        # constants and at most one -1, but not one with a symbolic size, which would split the layer's partition.
        # Queries: project, norm per head, rotate.
        q = self.q_norm(self.q_proj(x).view(b, -1, self.num_heads, self.head_dim))
        q = apply_rotary(q, cos, sin, self.rotation_q).transpose(1, 2)  # shape: [B, H, T, D]

        # Keys and values: own projections (stored through the strategy) or the producer's.
        if self.is_kv_shared:
            if shared is None:
                raise ValueError(f"layer {self.layer} shares K/V but its producer's keys and values were not passed")
            key_values = shared
        else:
            k = self.k_norm(self.k_proj(x).view(b, -1, self.num_kv_heads, self.head_dim))
            k = apply_rotary(k, cos, sin, self.rotation_k).transpose(1, 2)  # shape: [B, H_kv, T, D]
            v = self.v_norm(self.v_proj(x).view(b, -1, self.num_kv_heads, self.head_dim)).transpose(1, 2)
            key_values = kv.update(self.layer, k, v, positions)

        # Grouped-query attention as 3-D batched matmuls over the B * H_kv key/value heads: the G = H / H_kv query
        # heads that read one key/value head are stacked along the rows, so query head h reads key/value head h // G
        # without copying keys and values G times. A transposed tensor is made contiguous before its reshape, because
        # the reshape of a strided tensor is exported with the symbolic sizes in place of the -1.
        groups = self.num_heads // self.num_kv_heads
        kv_heads = b * self.num_kv_heads
        q_rows = q.contiguous().view(kv_heads, -1, self.head_dim)  # shape: [B * H_kv, G * T, D]
        keys = key_values.keys.reshape(kv_heads, -1, self.head_dim)  # shape: [B * H_kv, S, D]
        values = key_values.values.reshape(kv_heads, -1, self.head_dim)

        # The score scale is 1.0 because q and k are RMS-normed. Mask and softmax run in float32.
        scores = to_float32(torch.bmm(q_rows, keys.transpose(1, 2)))  # shape: [B * H_kv, G * T, S]
        # An additive 0/-inf bias equals masked_fill, and the addition stays in the XNNPACK partition of the scores.
        visible = attention_mask(positions, key_values.positions, self.sliding_window)  # shape: [T, S]
        scores = scores + torch.where(visible, 0.0, float("-inf")).repeat(groups, 1)
        weights = to_dtype(torch.softmax(scores, dim=-1), q.dtype)

        out = torch.bmm(weights, values).view(b, self.num_heads, -1, self.head_dim)  # shape: [B, H, T, D]
        out = out.transpose(1, 2).contiguous().view(b, -1, self.num_heads * self.head_dim)
        return self.o_proj(out), key_values
