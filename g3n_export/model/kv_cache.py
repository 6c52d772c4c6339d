"""Key/value storage strategies shared by one attention implementation.

Attention asks its strategy to `update` a layer with the new keys and values and gets back `KeyValues`: what to attend
to, with the absolute position of every key slot. The attention mask is derived from those positions alone, so the two
strategies below share all attention math:

* `StaticKVCache` keeps fixed-size buffers (the ExecuTorch style): a `max_seq_len` buffer per full-attention layer, and
  a window-sized ring buffer per sliding-window layer.
* `FunctionalKV` takes the past keys and values as inputs and returns the full history (past + new) as `present` (the
  ONNX style), leaving the sliding window to the mask.

Only layers that compute their own K/V (`TextConfig.kv_layers`) get storage. KV-shared layers reuse their producer's
`KeyValues` from the same forward pass.

Shape notation: B batch, H_kv key/value heads, T new tokens, S key slots, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from g3n_export.config import TextConfig

@dataclass
class KeyValues:
    """Keys and values one attention call attends to, with the absolute position of each key slot.

    Attributes:
        keys: `[B, H_kv, S, D]`.
        values: `[B, H_kv, S, D]`.
        positions: int64 `[S]`. A negative position marks an empty slot, which the mask hides.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


class KVStrategy(Protocol):
    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> KeyValues:
        """Store the new `keys`/`values` `[B, H_kv, T, D]` of `layer` at int64 `positions` `[T]`.

        Returns everything the layer attends to, including the new tokens.
        """
        ...


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Return the bool mask `[T, S]`: True where a query may attend to a key.

    A query at position i sees keys at positions j with `0 <= j <= i`, and with a sliding window W also `j > i - W`,
    so the window holds W keys including the current token (transformers' `kv_idx > q_idx - sliding_window`).
    """
    q = query_positions[:, None]  # shape: [T, 1]
    k = key_positions[None, :]  # shape: [1, S]
    visible = (k <= q) & (k >= 0)
    if sliding_window is not None:
        visible = visible & (k > q - sliding_window)
    return visible


class FullLayerCache(nn.Module):
    """Buffers of `max_seq_len` slots. Slot j stores position j, written with `index_copy_`."""

    def __init__(self, max_batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
        self.dtype = dtype
        self.register_buffer("k_cache", torch.zeros(self.shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(self.shape, dtype=dtype), persistent=False)
        self.register_buffer("slot_positions", torch.arange(max_seq_len), persistent=False)

    def reset_buffers(self) -> None:
        """Zero the cache (and rebuild the buffers when the module was created on the meta device)."""
        self.k_cache = torch.zeros(self.shape, dtype=self.dtype)
        self.v_cache = torch.zeros(self.shape, dtype=self.dtype)
        self.slot_positions = torch.arange(self.shape[2])

    def update(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> KeyValues:
        # Slots after the newest position hold stale or zero rows, which the causal mask hides.
        self.k_cache.index_copy_(2, positions, keys)
        self.v_cache.index_copy_(2, positions, values)
        return KeyValues(self.k_cache, self.v_cache, self.slot_positions)


class RingLayerCache(nn.Module):
    """Ring buffers of `ring_size` slots for a sliding-window layer. Position p lives in slot `p % ring_size`.

    An update attends over the ring as it was before the call followed by all new tokens, so a chunk longer than the
    window still sees every key its banded mask allows. The ring is then rewritten with the newest `ring_size`
    positions. A chunk can hold more tokens than the ring, so the rewrite gathers each slot's newest token instead of
    scattering the chunk (a scatter would write one slot several times).
    """

    def __init__(self, max_batch_size: int, num_kv_heads: int, ring_size: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.shape = (max_batch_size, num_kv_heads, ring_size, head_dim)
        self.ring_size = ring_size
        self.dtype = dtype
        self.register_buffer("k_cache", torch.zeros(self.shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(self.shape, dtype=dtype), persistent=False)
        self.register_buffer("slots", torch.arange(ring_size), persistent=False)

    def reset_buffers(self) -> None:
        """Zero the cache (and rebuild the buffers when the module was created on the meta device)."""
        self.k_cache = torch.zeros(self.shape, dtype=self.dtype)
        self.v_cache = torch.zeros(self.shape, dtype=self.dtype)
        self.slots = torch.arange(self.ring_size)

    def _newest_position(self, last: torch.Tensor) -> torch.Tensor:
        # Newest position <= last that maps to each slot, negative when no such position exists yet. The dividend is
        # kept non-negative (last >= -1) because ExecuTorch 1.5.1's portable remainder kernel truncates toward zero.
        return last - torch.remainder(last - self.slots + self.ring_size, self.ring_size)

    def update(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> KeyValues:
        n_new = keys.shape[2]
        start = positions[:1]  # shape: [1], the number of tokens stored before this call

        # Attend over the ring before this call, then the new tokens.
        ring_positions = self._newest_position(start - 1)  # shape: [R]
        all_keys = torch.cat((self.k_cache, keys), dim=2)  # shape: [B, H_kv, R + T, D]
        all_values = torch.cat((self.v_cache, values), dim=2)
        all_positions = torch.cat((ring_positions, positions))  # shape: [R + T]

        # Slot s keeps its old row unless a new token is now the newest position for it.
        newest = self._newest_position(start + n_new - 1)  # shape: [R]
        source = torch.where(newest >= start, self.ring_size + newest - start, self.slots)
        self.k_cache.copy_(all_keys.index_select(2, source))
        self.v_cache.copy_(all_values.index_select(2, source))
        return KeyValues(all_keys, all_values, all_positions)


class StaticKVCache(nn.Module):
    """Fixed-size KV buffers for the KV-owning layers, updated in place (ExecuTorch-style mutable buffers).

    Full-attention layers get `max_seq_len` slots, and sliding-window layers a ring of `min(sliding_window, max_seq_len)`.
    A new sequence may start at position 0 without a reset: the mask only admits slots written in this sequence.

    Args:
        config: the decoder config. Storage is created for `config.kv_layers` only.
        max_batch_size: batch size of every call (the buffers have this batch dimension).
        max_seq_len: largest position + 1 a call may write.
        dtype: dtype of the buffers (the model's activation dtype).
    """

    def __init__(self, config: TextConfig, max_batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.kv_layers = config.kv_layers
        self._index = {layer: i for i, layer in enumerate(self.kv_layers)}
        caches: list[nn.Module] = []
        for layer in self.kv_layers:
            args = (max_batch_size, config.num_key_value_heads)
            if config.is_sliding(layer):
                ring = min(config.sliding_window, max_seq_len)
                caches.append(RingLayerCache(*args, ring, config.head_dim, dtype))
            else:
                caches.append(FullLayerCache(*args, max_seq_len, config.head_dim, dtype))
        self.layers = nn.ModuleList(caches)

    def reset_buffers(self) -> None:
        for cache in self.layers:
            cache.reset_buffers()

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> KeyValues:
        return self.layers[self._index[layer]].update(keys, values, positions)


class FunctionalKV:
    """Past keys and values in, full history out: `present = cat(past, new)` along the sequence dimension.

    The past of every KV-owning layer must hold positions `0 .. P-1` (no padding), as in the ONNX decoder contract.

    Args:
        past: layer index -> (keys, values), each `[B, H_kv, P, D]`, where P may be 0.
    """

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> KeyValues:
        past_keys, past_values = self.past[layer]
        all_keys = torch.cat((past_keys, keys), dim=2)  # shape: [B, H_kv, P + T, D]
        all_values = torch.cat((past_values, values), dim=2)
        past_positions = torch.arange(past_keys.shape[2], device=positions.device)
        self.present[layer] = (all_keys, all_values)
        return KeyValues(all_keys, all_values, torch.cat((past_positions, positions)))
