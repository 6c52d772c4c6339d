"""Tensor names and shapes of the Hugging Face Gemma 3n checkpoint layout.

Text decoder tensors are named relative to the text prefix (`model.language_model.` in the released multimodal
checkpoints). The checkpoint keeps `k_proj`, `v_proj` and `k_norm` for KV-shared layers although no implementation
uses them, so they are part of the layout.
"""

from __future__ import annotations

import re
from pathlib import Path

from g3n_export.config import TextConfig

TEXT_PREFIX = "model.language_model."
LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")

_TOWERS_FILE = Path(__file__).parent / "data" / "gemma3n_towers.tsv"


def text_shapes(config: TextConfig, *, include_unused_kv: bool = True) -> dict[str, tuple[int, ...]]:
    """Return every text decoder tensor name (relative to the text prefix) with its shape, in checkpoint order.

    Args:
        config: the decoder config.
        include_unused_kv: keep `k_proj`/`v_proj`/`k_norm` of KV-shared layers, as the released checkpoints do.
    """
    d = config.hidden_size
    p = config.hidden_size_per_layer_input
    n = config.num_hidden_layers
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    a = config.altup_num_inputs

    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (config.vocab_size, d),
        "embed_tokens_per_layer.weight": (config.vocab_size_per_layer_input, n * p),
        "per_layer_model_projection.weight": (n * p, d),
        "per_layer_projection_norm.weight": (p,),
    }
    for k in range(a - 1):
        shapes[f"altup_projections.{k}.weight"] = (d, d)
    for k in range(a - 1):
        shapes[f"altup_unembed_projections.{k}.weight"] = (d, d)
    shapes["norm.weight"] = (d,)

    for i in range(n):
        w = config.intermediate_size[i]
        layer = {
            "self_attn.q_proj.weight": (q_dim, d),
            "self_attn.k_proj.weight": (kv_dim, d),
            "self_attn.v_proj.weight": (kv_dim, d),
            "self_attn.o_proj.weight": (d, q_dim),
            "self_attn.q_norm.weight": (config.head_dim,),
            "self_attn.k_norm.weight": (config.head_dim,),
            "mlp.gate_proj.weight": (w, d),
            "mlp.up_proj.weight": (w, d),
            "mlp.down_proj.weight": (d, w),
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "pre_feedforward_layernorm.weight": (d,),
            "post_feedforward_layernorm.weight": (d,),
            "altup.correct_output_scale": (d,),
            "altup.correction_coefs.weight": (a, a),
            "altup.prediction_coefs.weight": (a * a, a),
            "altup.modality_router.weight": (a, d),
            "altup.router_norm.weight": (d,),
            "laurel.linear_left.weight": (config.laurel_rank, d),
            "laurel.linear_right.weight": (d, config.laurel_rank),
            "laurel.post_laurel_norm.weight": (d,),
            "per_layer_input_gate.weight": (p, d),
            "per_layer_projection.weight": (d, p),
            "post_per_layer_input_norm.weight": (d,),
        }
        for name, shape in sorted(layer.items()):
            if not include_unused_kv and config.is_kv_shared(i) and is_unused_kv_name(name):
                continue
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def is_unused_kv_name(name: str) -> bool:
    """True for the per-layer tensors that a KV-shared layer carries but never uses."""
    return name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight"))


def layer_index(name: str) -> int | None:
    """Decoder layer index in a tensor name, or None for a global tensor."""
    m = LAYER_RE.search(name)
    return int(m.group(2)) if m else None


def tower_shapes() -> dict[str, tuple[int, ...]]:
    """Return the vision/audio tower and embedder tensors of the released checkpoints (full names), with shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for line in _TOWERS_FILE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape, _ = line.split("\t")
        shapes[name] = tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())
    return shapes


def parameter_group(text_name: str) -> str:
    """Group of a text tensor (name relative to the text prefix) for parameter and byte budgets."""
    if text_name == "embed_tokens.weight":
        return "embed_tokens"
    if text_name == "embed_tokens_per_layer.weight":
        return "ple_table"
    if text_name.startswith("per_layer_model_projection") or text_name.startswith("per_layer_projection_norm"):
        return "ple_projection"
    if text_name.startswith("altup_"):
        return "altup_projections"
    if ".mlp." in text_name:
        return "mlp"
    if ".self_attn." in text_name:
        return "attention"
    if ".laurel." in text_name:
        return "laurel"
    if ".per_layer_" in text_name or ".post_per_layer_input_norm" in text_name:
        return "ple_per_layer"
    return "norms_and_altup"


def tower_group(name: str) -> str:
    """Group of a non-text tensor (full name)."""
    if name.startswith("model.vision_tower."):
        return "vision_tower"
    if name.startswith("model.audio_tower."):
        return "audio_tower"
    if name.startswith("model.embed_vision.") or name.startswith("model.embed_audio."):
        return "multimodal_embedders"
    if name == "lm_head.weight":
        return "lm_head"
    return "other"
