"""MatFormer Mix-n-Match: the rules for cutting a Gemma 3n submodel out of the full (E4B-style) model.

A submodel keeps a subset of the decoder layers and, in each kept layer, a prefix of the FFN hidden units. This module
validates a choice against the source config, derives the submodel's config and maps every source tensor to its
submodel tensor. It works on tensors only, so the streaming checkpoint slicer and the MatFormer training loop share
one set of rules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from g3n_export.config import TextConfig, default_layer_types
from g3n_export.errors import RecipeError
from g3n_export.layout import LAYER_RE, is_unused_kv_name, layer_index, text_shapes

BLOCK = 5  # four sliding-window layers, then one full-attention layer


@dataclass(frozen=True)
class SlicePlan:
    """A validated submodel of `source`: kept layers (source indices) and the FFN width of each kept layer."""

    source: TextConfig
    kept: tuple[int, ...]
    ffn_widths: tuple[int, ...]
    drop_unused_kv: bool = False

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.source.num_hidden_layers) if i not in set(self.kept))

    @property
    def is_identity(self) -> bool:
        return (
            len(self.kept) == self.source.num_hidden_layers
            and self.ffn_widths == self.source.intermediate_size
            and not self.drop_unused_kv
        )

    @property
    def target(self) -> TextConfig:
        """Config of the submodel."""
        return TextConfig.from_hf_dict({"model_type": "gemma3n_text", **self.text_updates(_base_text_dict(self.source))})

    def text_updates(self, text: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of a text config dict rewritten for the submodel."""
        src = self.source
        shared_skipped = sum(1 for i in self.skipped if src.is_kv_shared(i))
        out = dict(text)
        out["num_hidden_layers"] = len(self.kept)
        out["intermediate_size"] = list(self.ffn_widths)
        # transformers 5 rejects a layer_types list whose length differs from num_hidden_layers.
        out["layer_types"] = [src.layer_types[i] for i in self.kept]
        out["activation_sparsity_pattern"] = [src.activation_sparsity_pattern[i] for i in self.kept]
        out["num_kv_shared_layers"] = src.num_kv_shared_layers - shared_skipped
        return out

    def config_dict(self, source_config: dict[str, Any]) -> dict[str, Any]:
        """Return the submodel's full `config.json` dict (multimodal wrapper kept when the source has one)."""
        out = copy.deepcopy(source_config)
        if out.get("model_type") == "gemma3n":
            out["text_config"] = self.text_updates(out["text_config"])
        else:
            out = self.text_updates(out)
        return out

    # Tensor mapping -------------------------------------------------------------------------------------------

    def target_name(self, name: str) -> str | None:
        """Submodel name of a source text tensor (relative to the text prefix), or None when it is dropped."""
        layer = layer_index(name)
        if layer is None:
            return name
        if layer not in self._new_index:
            return None
        new = self._new_index[layer]
        if self.drop_unused_kv and is_unused_kv_name(name) and self.target.is_kv_shared(new):
            return None
        return LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{new}.", name, count=1)

    def slice_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Cut a source text tensor to its submodel shape. Works on views, so gradients flow (MatFormer training).

        The PLE table can be passed whole or as a block of rows: only its columns are selected.
        """
        layer = layer_index(name)
        if layer is not None:
            width = self.ffn_widths[self._new_index[layer]]
            if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
                return tensor[:width, :]
            if name.endswith("mlp.down_proj.weight"):
                return tensor[:, :width]
            return tensor
        per_layer = self.source.hidden_size_per_layer_input
        n = self.source.num_hidden_layers
        kept = torch.tensor(self.kept, device=tensor.device)
        if name == "per_layer_model_projection.weight":
            d = tensor.shape[1]
            return tensor.reshape(n, per_layer, d).index_select(0, kept).reshape(len(self.kept) * per_layer, d)
        if name == "embed_tokens_per_layer.weight":
            rows = tensor.shape[0]
            return tensor.reshape(rows, n, per_layer).index_select(1, kept).reshape(rows, len(self.kept) * per_layer)
        return tensor

    @property
    def _new_index(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return text_shapes(self.target, include_unused_kv=not self.drop_unused_kv)


def _base_text_dict(c: TextConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "vocab_size_per_layer_input": c.vocab_size_per_layer_input,
        "hidden_size": c.hidden_size,
        "hidden_size_per_layer_input": c.hidden_size_per_layer_input,
        "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": list(c.intermediate_size),
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "layer_types": list(c.layer_types),
        "sliding_window": c.sliding_window,
        "rope_parameters": {t: {"rope_type": "default", "rope_theta": th} for t, th in c.rope_theta.items()},
        "rms_norm_eps": c.rms_norm_eps,
        "final_logit_softcapping": c.final_logit_softcapping,
        "altup_num_inputs": c.altup_num_inputs,
        "altup_active_idx": c.altup_active_idx,
        "altup_coef_clip": c.altup_coef_clip,
        "altup_correct_scale": c.altup_correct_scale,
        "laurel_rank": c.laurel_rank,
        "activation_sparsity_pattern": list(c.activation_sparsity_pattern),
        "num_kv_shared_layers": c.num_kv_shared_layers,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_activation": c.hidden_activation,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids),
    }


def check_source(source: TextConfig) -> None:
    """Check that a config has the E4B structure MatFormer slicing assumes.

    Raises:
        RecipeError: the layer pattern is not blocks of four sliding layers and one full layer, or the KV-shared
            region does not start on a block boundary.
    """
    if source.layer_types != default_layer_types(source.num_hidden_layers):
        raise RecipeError(
            "the source model is not a Gemma 3n E4B-style checkpoint: its layer_types do not follow the pattern "
            "of four sliding-window layers then one full-attention layer, so MatFormer recipes do not apply"
        )
    if source.num_hidden_layers % BLOCK or source.first_kv_shared_layer % BLOCK:
        raise RecipeError(
            f"the source model is not a Gemma 3n E4B-style checkpoint: num_hidden_layers "
            f"({source.num_hidden_layers}) and the first KV-shared layer ({source.first_kv_shared_layer}) must be "
            f"multiples of {BLOCK}"
        )


def make_plan(
    source: TextConfig,
    layers_to_skip: list[int] | tuple[int, ...],
    ffn_widths: list[int] | tuple[int, ...],
    *,
    drop_unused_kv: bool = False,
) -> SlicePlan:
    """Validate a Mix-n-Match choice against the source and return its plan. Nothing is read or written.

    Args:
        source: config of the full model.
        layers_to_skip: source layer indices to remove.
        ffn_widths: FFN hidden width for each kept layer, indexed by the new layer index.
        drop_unused_kv: also drop `k_proj`/`v_proj`/`k_norm` of KV-shared layers, which no implementation reads.

    Raises:
        RecipeError: with every problem found, each naming the value and the fix.
    """
    check_source(source)
    n = source.num_hidden_layers
    errors: list[str] = []

    unknown = sorted(i for i in layers_to_skip if not (isinstance(i, int) and 0 <= i < n))
    if unknown:
        errors.append(f"layers_to_skip contains {unknown}, but the source has layers 0..{n - 1}")
    if len(set(layers_to_skip)) != len(layers_to_skip):
        errors.append(f"layers_to_skip lists a layer twice: {sorted(layers_to_skip)}")
    skip = {i for i in layers_to_skip if isinstance(i, int) and 0 <= i < n}
    kept = tuple(i for i in range(n) if i not in skip)

    producers = sorted({p for p in source.kv_producer if p is not None})
    reserved = sorted(skip & set(producers))
    if reserved:
        errors.append(
            f"layers {reserved} are reserved: KV-shared layers read their keys and values from layers {producers}; "
            "remove them from layers_to_skip"
        )
    broken = [b for b in range(0, n, BLOCK) if 0 < len(skip & set(range(b, b + BLOCK))) < BLOCK]
    if broken:
        blocks = ", ".join(f"{b}-{b + BLOCK - 1}" for b in broken)
        errors.append(
            f"layers_to_skip {sorted(skip)} breaks the block pattern of four sliding-window layers and one "
            f"full-attention layer (partial blocks: {blocks}); skip whole blocks such as 20-24"
        )
    if not kept:
        errors.append("layers_to_skip removes every layer")

    widths = tuple(ffn_widths)
    if len(widths) != len(kept):
        errors.append(
            f"the FFN width list has {len(widths)} entries, but {len(kept)} layers are kept "
            f"({n} - {len(skip)} skipped); give one width per kept layer"
        )
    else:
        for new, (old, w) in enumerate(zip(kept, widths)):
            if not isinstance(w, int) or w <= 0:
                errors.append(f"FFN width for layer {old} (new index {new}) must be a positive integer, got {w!r}")
            elif w > source.intermediate_size[old]:
                errors.append(
                    f"FFN width {w} for layer {old} (new index {new}) is larger than the source's "
                    f"{source.intermediate_size[old]}; a MatFormer slice can only keep a prefix of the FFN"
                )
    if errors:
        raise RecipeError("invalid size recipe: " + "; ".join(errors))
    return SlicePlan(source=source, kept=kept, ffn_widths=widths, drop_unused_kv=drop_unused_kv)


def effective_parameters(config: TextConfig) -> int:
    """Parameters of the text decoder without the token embedding and the PLE table (the "effective" count).

    Counts the unused k/v weights of KV-shared layers, as Google's published numbers do.
    """
    total = 0
    for name, shape in text_shapes(config).items():
        if name in ("embed_tokens.weight", "embed_tokens_per_layer.weight"):
            continue
        numel = 1
        for s in shape:
            numel *= s
        total += numel
    return total


class SlicedCheckpoint:
    """Read-only view of a checkpoint's text decoder as a MatFormer submodel, sliced tensor by tensor on access.

    It offers the text side of `Checkpoint` (`text_config`, `text_names`, `text_tensor`), so the decoder and the
    float reference can load a submodel straight from the full checkpoint without writing a sliced copy first.
    """

    def __init__(self, checkpoint, plan: SlicePlan) -> None:
        self.checkpoint = checkpoint
        self.plan = plan
        self.text_config = plan.target
        self.path = checkpoint.path
        self._source_name: dict[str, str] = {}
        for name in checkpoint.text_names():
            new = plan.target_name(name)
            if new is not None:
                self._source_name[new] = name

    def text_names(self) -> list[str]:
        return list(self._source_name)

    def text_tensor(self, name: str) -> torch.Tensor:
        source = self._source_name[name]
        return self.plan.slice_tensor(source, self.checkpoint.text_tensor(source))

    def text_tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Load rows `start:stop` of one submodel text tensor (see `Checkpoint.text_tensor_rows`)."""
        source = self._source_name[name]
        if name == "per_layer_model_projection.weight":
            # Its rows are regrouped by layer, so a block of submodel rows is not a block of source rows. It is small
            # (layers x PLE width rows).
            rows = self.checkpoint.info(self.checkpoint.text_prefix + source).shape[0]
            whole = self.checkpoint.text_tensor_rows(source, 0, rows)
            return self.plan.slice_tensor(source, whole)[start:stop]
        # Every other cut keeps a prefix of the source rows or selects columns, so source rows start:stop give the
        # submodel rows start:stop.
        return self.plan.slice_tensor(source, self.checkpoint.text_tensor_rows(source, start, stop))
