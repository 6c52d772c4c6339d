"""One Gemma 3n decoder layer: AltUp predict, attention + LAuReL, sparse MLP, AltUp correct, per-layer input."""

from __future__ import annotations

import math

import torch
from torch import nn

from g3n_export.config import TextConfig
from g3n_export.model.altup import AltUp
from g3n_export.model.attention import Attention
from g3n_export.model.kv_cache import KeyValues, KVStrategy
from g3n_export.model.laurel import Laurel
from g3n_export.model.mlp import MLP
from g3n_export.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """A decoder layer over the A AltUp streams. Submodule names match the checkpoint's `layers.{i}.*`."""

    def __init__(self, config: TextConfig, layer: int) -> None:
        super().__init__()
        d = config.hidden_size
        eps = config.rms_norm_eps
        self.altup_correct_scale = config.altup_correct_scale
        self.active_stream = config.altup_active_idx

        self.altup = AltUp(d, config.altup_num_inputs, config.altup_active_idx, eps)
        self.input_layernorm = RMSNorm(d, eps)
        self.laurel = Laurel(d, config.laurel_rank, eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, config.intermediate_size[layer], config.sparsity_z(layer))
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.per_layer_input_gate = nn.Linear(d, config.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(config.hidden_size_per_layer_input, d, bias=False)
        self.post_per_layer_input_norm = RMSNorm(d, eps)

    def forward(
        self,
        streams: list[torch.Tensor],
        per_layer_input: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        kv: KVStrategy,
        shared: KeyValues | None = None,
    ) -> tuple[list[torch.Tensor], KeyValues]:
        """Run the layer on the A streams, each `[B, T, d]`, with this layer's `per_layer_input` `[B, T, P]`.

        Returns the new streams and the `KeyValues` the attention read (see `Attention.forward`).
        """
        # AltUp predicts all streams, but only the active stream goes through attention and MLP.
        predictions = self.altup.predict(streams)
        active = predictions[self.active_stream]  # shape: [B, T, d]
        normed = self.input_layernorm(active)

        # Attention and LAuReL both read the normed active stream, and their residual sum is scaled by 1/sqrt(2).
        laurel_out = self.laurel(normed)
        attn, key_values = self.self_attn(normed, rope, positions, kv, shared)
        attn = active + self.post_attention_layernorm(attn)
        attn_laurel = (attn + laurel_out) / math.sqrt(2)

        # Feed-forward with its own pre/post norms and residual.
        ffw = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(attn_laurel)))
        activated = attn_laurel + ffw

        # AltUp correct propagates the change of the active stream to all streams.
        corrected = self.altup.correct(predictions, activated)

        # Per-layer input: gate the corrected active stream, modulate by the PLE slice, project back to d.
        gate = corrected[self.active_stream]
        if self.altup_correct_scale:
            gate = self.altup.scale_output(gate)
        gate = nn.functional.gelu(self.per_layer_input_gate(gate), approximate="tanh") * per_layer_input
        injected = self.post_per_layer_input_norm(self.per_layer_projection(gate))  # shape: [B, T, d]

        # Streams 1..A-1 receive the per-layer signal, but stream 0 does not.
        return [corrected[0]] + [s + injected for s in corrected[1:]], key_values
