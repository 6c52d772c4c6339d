"""The Gemma 3n text decoder: the decoder stack, the static-cache model and the functional past/present variant.

Shape notation: B batch, T new tokens, d hidden_size, L layers, P hidden_size_per_layer_input, A AltUp streams,
V vocab_size.

* `DecoderStack` maps `(inputs_embeds, per_layer_tokens, positions, kv)` to logits. It owns every weight except the
  token-id gathers, including the LM head (tied to the token embedding).
* `Gemma3nDecoder` is the whole model with a static KV cache: `forward(tokens, input_pos) -> logits`, one code path for
  prefill (any T) and decode. `model.embedder` is the token-id side and `model.functional()` the past/present variant.
* `FunctionalKVDecoder` runs the same stack with explicit `past` keys/values in and `present` out.
"""

from __future__ import annotations

import torch
from torch import nn

from g3n_export.config import TextConfig
from g3n_export.model.casts import to_dtype, to_float32
from g3n_export.model.embedding import Embedder, rounded_per_dtype
from g3n_export.model.kv_cache import FunctionalKV, KeyValues, KVStrategy, StaticKVCache
from g3n_export.model.layer import DecoderLayer
from g3n_export.model.norm import RMSNorm, rms_magnitude
from g3n_export.model.rope import RotaryEmbedding

# Lower clamp of the mean square when a projected AltUp stream is rescaled (transformers 5 uses the same value).
_MIN_MEAN_SQUARE = 1e-5


class DecoderStack(nn.Module):
    """Everything after the token-id gathers: PLE projection, AltUp expansion, the layers, unembedding, LM head.

    Module names below `DecoderStack` match the checkpoint's text tensor names (see `weights.py`).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        n = config.num_hidden_layers
        p = config.hidden_size_per_layer_input
        eps = config.rms_norm_eps

        self.per_layer_model_projection = nn.Linear(d, n * p, bias=False)
        self.per_layer_projection_norm = RMSNorm(p, eps)  # one weight shared by all layers
        self.altup_projections = nn.ModuleList(
            nn.Linear(d, d, bias=False) for _ in range(config.altup_num_inputs - 1)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(n))
        self.altup_unembed_projections = nn.ModuleList(
            nn.Linear(d, d, bias=False) for _ in range(config.altup_num_inputs - 1)
        )
        self.norm = RMSNorm(d, eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.rope = nn.ModuleDict(
            {kind: RotaryEmbedding(config.head_dim, config.rope_theta[kind]) for kind in sorted(set(config.layer_types))}
        )
        self._projection_scale = rounded_per_dtype(d**-0.5)
        self._combine_scale = rounded_per_dtype(torch.rsqrt(torch.tensor(2.0, device="cpu")).item())

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        per_layer_tokens: torch.Tensor,
        positions: torch.Tensor,
        kv: KVStrategy,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Return float32 logits `[B, T, V]`, or `[B, K, V]` for the last K positions when `logits_to_keep` is K > 0.

        Args:
            inputs_embeds: `[B, T, d]`, the scaled token embedding (`Embedder`).
            per_layer_tokens: `[B, T, L, P]`, the token part of the per-layer inputs (`PerLayerEmbedding`).
            positions: int64 `[T]`, absolute positions of the T tokens.
            kv: the KV storage strategy (`StaticKVCache` or `FunctionalKV`).
            logits_to_keep: 0 for every position, as transformers' argument of the same name.
        """
        config = self.config
        per_layer_inputs = self.project_per_layer_inputs(inputs_embeds, per_layer_tokens)  # shape: [B, T, L, P]
        streams = self.expand_streams(inputs_embeds)  # A x [B, T, d]
        rope = {kind: module(positions) for kind, module in self.rope.items()}

        # KV-shared layers read their producer's KeyValues from this pass, after the producer's update.
        produced: dict[int, KeyValues] = {}
        for i, layer in enumerate(self.layers):
            producer = config.kv_producer[i]
            shared = produced[producer] if producer is not None else None
            streams, key_values = layer(
                streams, per_layer_inputs[:, :, i, :], rope[config.layer_types[i]], positions, kv, shared
            )
            if producer is None:
                produced[i] = key_values

        if logits_to_keep > 0:
            # Everything after the last layer is per position, so the other positions can be dropped here.
            streams = [stream[:, -logits_to_keep:] for stream in streams]
        hidden = self.norm(self.merge_streams(streams))  # shape: [B, T, d]
        return self.softcap(self.lm_head(hidden))

    def project_per_layer_inputs(self, inputs_embeds: torch.Tensor, per_layer_tokens: torch.Tensor) -> torch.Tensor:
        """Combine the token part with a projection of the embeddings: `(norm(proj(e) / sqrt(d)) + tokens) / sqrt(2)`."""
        dtype = inputs_embeds.dtype
        projected = self.per_layer_model_projection(inputs_embeds) * self._projection_scale[dtype]
        projected = projected.reshape(
            inputs_embeds.shape[0], -1, self.config.num_hidden_layers, self.config.hidden_size_per_layer_input
        )
        projected = self.per_layer_projection_norm(projected)  # shape: [B, T, L, P]
        return (projected + per_layer_tokens) * self._combine_scale[dtype]

    def expand_streams(self, inputs_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Build the A AltUp streams: the embeddings, then projections of them rescaled to the embeddings' RMS."""
        target = rms_magnitude(inputs_embeds)  # shape: [B, T, 1]
        streams = [inputs_embeds]
        for projection in self.altup_projections:
            projected = projection(inputs_embeds)
            rescaled = to_float32(projected) * target / rms_magnitude(projected, min_mean_square=_MIN_MEAN_SQUARE)
            streams.append(to_dtype(rescaled, inputs_embeds.dtype))
        return streams

    def merge_streams(self, streams: list[torch.Tensor]) -> torch.Tensor:
        """Unembed streams 1..A-1 (rescaled to the RMS of stream 0) and average all A streams."""
        first = streams[0]
        target = rms_magnitude(first)
        merged = [to_float32(first)]
        for projection, stream in zip(self.altup_unembed_projections, streams[1:]):
            projected = projection(stream)
            merged.append(to_float32(projected) * target / rms_magnitude(projected, min_mean_square=_MIN_MEAN_SQUARE))
        return to_dtype(torch.stack(merged).mean(dim=0), first.dtype)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply `cap * tanh(logits / cap)` in float32, or only cast to float32 when the config has no cap."""
        cap = self.config.final_logit_softcapping
        logits = to_float32(logits)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def reset_buffers(self) -> None:
        """Recompute the RoPE tables and the norms' and MLPs' constant rows (after a meta-device build)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()


class Gemma3nDecoder(nn.Module):
    """Gemma 3n text decoder with a static KV cache, ready for `torch.export` with a dynamic sequence length.

    Args:
        config: the decoder config.
        max_seq_len: number of positions the KV cache holds. Every call needs `input_pos + T <= max_seq_len`.
        max_batch_size: batch size of every call.
        dtype: dtype of the KV cache buffers, which should match the weights (`from_checkpoint` sets both).
        logits_to_keep: return logits for the last this many positions of each call, or for every position when 0.
            A generation loop needs only the last one, and a program with a static memory plan then holds a `[1, V]`
            output buffer instead of `[max_seq_len, V]` (about 1 GB at Gemma 3n's vocabulary and 1,024 positions).

    Attributes:
        embedder: token ids -> (inputs_embeds, per_layer_tokens). `embedder.per_layer_embedding` owns the PLE table.
        stack: the `DecoderStack`.
        kv_cache: `StaticKVCache`, one entry per KV-owning layer.
    """

    def __init__(
        self,
        config: TextConfig,
        max_seq_len: int,
        *,
        max_batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        logits_to_keep: int = 0,
    ) -> None:
        super().__init__()
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len}")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be 0 (every position) or positive, got {logits_to_keep}")
        self.config = config
        self.max_seq_len = max_seq_len
        self.logits_to_keep = logits_to_keep
        self.embedder = Embedder(config)
        self.stack = DecoderStack(config)
        self.stack.lm_head.weight = self.embedder.token_embedding.weight
        self.kv_cache = StaticKVCache(config, max_batch_size, max_seq_len, dtype)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Return float32 logits `[B, T, V]` for int64 `tokens` `[B, T]` starting at int64 `input_pos` `[1]`.

        Prefill passes the prompt with `input_pos = [0]`, or a chunk at its start position. Decode passes one token.
        With `logits_to_keep` K > 0 the logits are those of the last min(K, T) positions.
        """
        if not torch.compiler.is_compiling():
            self._validate_inputs(tokens, input_pos)
        positions = input_pos + torch.arange(tokens.shape[1], device=tokens.device)  # shape: [T]
        inputs_embeds, per_layer_tokens = self.embedder(tokens)
        return self.stack(inputs_embeds, per_layer_tokens, positions, self.kv_cache, self.logits_to_keep)

    def functional(self) -> FunctionalKVDecoder:
        """Return the past/present variant over the same weights (it does not use `kv_cache`)."""
        return FunctionalKVDecoder(self.stack)

    def reset_buffers(self) -> None:
        """Zero the KV cache and recompute the RoPE tables (also materializes them after a meta-device build)."""
        self.kv_cache.reset_buffers()
        self.stack.reset_buffers()

    def _validate_inputs(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [B, T], got {tokens.dtype} {list(tokens.shape)}")
        if input_pos.shape != (1,) or input_pos.dtype != torch.int64:
            raise ValueError(f"input_pos must be int64 [1], got {input_pos.dtype} {list(input_pos.shape)}")
        start, end = int(input_pos[0]), int(input_pos[0]) + tokens.shape[1]
        if start < 0 or end > self.max_seq_len:
            raise ValueError(
                f"positions {start}..{end - 1} do not fit the KV cache of max_seq_len {self.max_seq_len}: "
                "start a new sequence at input_pos 0 or build the model with a larger max_seq_len"
            )

    @classmethod
    def from_checkpoint(
        cls, checkpoint, max_seq_len: int, *, dtype: torch.dtype = torch.float32, max_batch_size: int = 1
    ) -> Gemma3nDecoder:
        """Build the model from a `g3n_export.checkpoint.Checkpoint` (any MatFormer slice), weights cast to `dtype`.

        The k_proj/v_proj/k_norm tensors of KV-shared layers are never read.

        Raises:
            CheckpointError: a tensor the model needs is missing or has the wrong shape.
        """
        from g3n_export.model.weights import load_hf_weights

        return load_hf_weights(
            cls, checkpoint.text_config, checkpoint.text_tensor, max_seq_len=max_seq_len, dtype=dtype,
            max_batch_size=max_batch_size, source=str(checkpoint.path),
        )

    @classmethod
    def from_hf_state_dict(
        cls,
        config: TextConfig,
        state_dict: dict[str, torch.Tensor],
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 1,
    ) -> Gemma3nDecoder:
        """Build the model from tensors keyed by checkpoint text names (relative to `model.language_model.`)."""
        from g3n_export.errors import CheckpointError
        from g3n_export.model.weights import load_hf_weights

        def get(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise CheckpointError(f"state dict has no tensor {name!r}, which the decoder needs")
            return state_dict[name]

        return load_hf_weights(
            cls, config, get, max_seq_len=max_seq_len, dtype=dtype, max_batch_size=max_batch_size, source="state dict"
        )


class FunctionalKVDecoder(nn.Module):
    """The decoder stack with explicit KV history: `past_*` in, `present_*` out, for graphs without mutable state.

    `forward(inputs_embeds, per_layer_tokens, positions, past_keys, past_values)` returns
    `(logits, present_keys, present_values)`. The lists follow `config.kv_layers`. Each past tensor is
    `[B, H_kv, P, D]` holding positions `0 .. P-1` (P may be 0), each present `[B, H_kv, P + T, D]`. Sliding-window
    layers keep their whole history too: the window is applied by the mask.
    """

    def __init__(self, stack: DecoderStack) -> None:
        super().__init__()
        self.stack = stack
        self.kv_layers = stack.config.kv_layers

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        per_layer_tokens: torch.Tensor,
        positions: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        if len(past_keys) != len(self.kv_layers) or len(past_values) != len(self.kv_layers):
            raise ValueError(
                f"expected {len(self.kv_layers)} past keys and values (one per KV-owning layer {list(self.kv_layers)}), "
                f"got {len(past_keys)} and {len(past_values)}"
            )
        kv = FunctionalKV({layer: (k, v) for layer, k, v in zip(self.kv_layers, past_keys, past_values)})
        logits = self.stack(inputs_embeds, per_layer_tokens, positions, kv)
        present_keys = [kv.present[layer][0] for layer in self.kv_layers]
        present_values = [kv.present[layer][1] for layer in self.kv_layers]
        return logits, present_keys, present_values

    def empty_past(self, batch_size: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return zero-length past keys and values for the first call."""
        config = self.stack.config
        weight = self.stack.norm.weight  # a norm weight keeps the activation dtype after quantization
        shape = (batch_size, config.num_key_value_heads, 0, config.head_dim)
        keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.kv_layers]
        values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.kv_layers]
        return keys, values
