"""Token-id side of the decoder: the scaled token embedding and the per-layer embedding (PLE) gather.

Both only gather rows, so a target can run them outside the accelerator graph: `Embedder` maps token ids to the two
tensors the decoder stack consumes, and `PerLayerEmbedding` can be placed on its own (the PLE table is about a third of
the checkpoint, yet each token reads one row of it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from g3n_export.config import TextConfig


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rounded_per_dtype(value: float) -> dict[torch.dtype, float]:
    """Return `value` rounded to each floating dtype, as the reference rounds its scale buffers to the weight dtype.

    Computed eagerly (on the CPU, also while the model is built on the meta device) so that `forward` only looks the
    constant up, which keeps the traced graph free of the rounding.
    """
    return {dtype: torch.tensor(value, dtype=torch.float32, device="cpu").to(dtype).item() for dtype in _FLOAT_DTYPES}


class TokenEmbedding(nn.Module):
    """Token embedding multiplied by `sqrt(hidden_size)`, the scale rounded to the weight dtype (45.25 in bfloat16).

    The weight is also the tied LM head, so a target that splits the graph needs it on both sides.
    """

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self._scale = rounded_per_dtype(math.sqrt(hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map int64 `tokens` `[B, T]` to `[B, T, hidden_size]`."""
        return nn.functional.embedding(tokens, self.weight) * self._scale.get(self.weight.dtype, self._scale[torch.float32])


class PerLayerEmbedding(nn.Module):
    """The token part of the per-layer inputs: one `hidden_size_per_layer_input` row slice per decoder layer.

    Ids outside `[0, vocab_size_per_layer_input)` (the multimodal ids and the padding rows of the token embedding) read
    row 0, the padding row. The gathered rows are multiplied by `sqrt(hidden_size_per_layer_input)`, 16 for the
    released models.
    """

    def __init__(self, vocab_size_per_layer_input: int, num_layers: int, hidden_size_per_layer_input: int) -> None:
        super().__init__()
        self.vocab_size_per_layer_input = vocab_size_per_layer_input
        self.num_layers = num_layers
        self.hidden_size_per_layer_input = hidden_size_per_layer_input
        self.weight = nn.Parameter(torch.empty(vocab_size_per_layer_input, num_layers * hidden_size_per_layer_input))
        self._scale = rounded_per_dtype(math.sqrt(hidden_size_per_layer_input))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map int64 `tokens` `[B, T]` to `per_layer_tokens` `[B, T, num_layers, hidden_size_per_layer_input]`."""
        in_table = (tokens >= 0) & (tokens < self.vocab_size_per_layer_input)
        rows = torch.where(in_table, tokens, torch.zeros_like(tokens))
        gathered = nn.functional.embedding(rows, self.weight) * self._scale.get(self.weight.dtype, self._scale[torch.float32])  # shape: [B, T, L * P]
        return gathered.reshape(tokens.shape[0], -1, self.num_layers, self.hidden_size_per_layer_input)


class Embedder(nn.Module):
    """`embed(tokens) -> (inputs_embeds, per_layer_tokens)`: everything the decoder stack needs from token ids."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.per_layer_embedding = PerLayerEmbedding(
            config.vocab_size_per_layer_input, config.num_hidden_layers, config.hidden_size_per_layer_input
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `inputs_embeds` `[B, T, D]` and `per_layer_tokens` `[B, T, L, P]` for int64 `tokens` `[B, T]`."""
        return self.token_embedding(tokens), self.per_layer_embedding(tokens)
