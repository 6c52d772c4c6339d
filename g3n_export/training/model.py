"""The bundled model's configuration, and nested submodels that share the full model's parameters.

Training uses transformers' `Gemma3nForCausalLM` as the model, because it is the reference implementation that every
export is compared against. A submodel is a `Gemma3nForCausalLM` of the sliced configuration whose own parameters are
never used: each forward call passes it views of the full model's parameters, cut by the MatFormer slicing rules in
`g3n_export.matformer`, so the submodel's loss trains the shared full-model weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from g3n_export.config import TextConfig, default_layer_types, default_sparsity
from g3n_export.matformer import SlicePlan
from g3n_export.tokenizer import BOS_ID, EOS_ID, PAD_ID

MODEL_PREFIX = "model."  # Gemma3nForCausalLM's name for the decoder; the checkpoint uses "model.language_model."


@dataclass(frozen=True)
class Dims:
    """Widths of the bundled model. The layer structure is E4B's and is not a parameter."""

    vocab: int = 4096
    placeholder_rows: int = 64
    hidden: int = 128
    ffn: int = 384
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ple_width: int = 16
    laurel_rank: int = 16
    sliding_window: int = 32
    max_positions: int = 512


def config_dict(dims: Dims) -> dict[str, Any]:
    """Return the text-only `config.json` of the bundled model, with every per-layer list written out."""
    layers = 35
    return {
        "architectures": ["Gemma3nForCausalLM"],
        "model_type": "gemma3n_text",
        "dtype": "bfloat16",
        # vocab_size = PLE rows + placeholder rows, as in the released models (262,400 = 262,144 + 256); ids at or
        # above vocab_size_per_layer_input use PLE row 0.
        "vocab_size": dims.vocab + dims.placeholder_rows,
        "vocab_size_per_layer_input": dims.vocab,
        "hidden_size": dims.hidden,
        "hidden_size_per_layer_input": dims.ple_width,
        "num_hidden_layers": layers,
        "intermediate_size": [dims.ffn] * layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": list(default_layer_types(layers)),
        "sliding_window": dims.sliding_window,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        "max_position_embeddings": dims.max_positions,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "altup_num_inputs": 4,
        "altup_active_idx": 0,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "laurel_rank": dims.laurel_rank,
        "activation_sparsity_pattern": list(default_sparsity(layers)),
        "num_kv_shared_layers": 15,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
    }


def build_model(config: dict[str, Any]):
    """Instantiate `Gemma3nForCausalLM` (float32, randomly initialized) from a text `config.json` dict."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    return Gemma3nForCausalLM(Gemma3nTextConfig.from_dict(config))


def text_name(parameter_name: str) -> str:
    """Checkpoint name, relative to the text prefix, of a `Gemma3nForCausalLM` parameter."""
    if not parameter_name.startswith(MODEL_PREFIX):
        raise ValueError(f"unexpected parameter {parameter_name!r} outside the decoder")
    return parameter_name[len(MODEL_PREFIX):]


class Submodel:
    """A nested submodel that runs on slices of a full model's parameters."""

    def __init__(self, plan: SlicePlan, source_config: dict[str, Any]) -> None:
        self.plan = plan
        self.config = plan.config_dict(source_config)
        self.skeleton = build_model(self.config)
        self.skeleton.requires_grad_(False)
        self._expected = {name for name, _ in self.skeleton.named_parameters()}

    def parameters_from(self, full_model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Return the submodel's parameters as slices (views) of `full_model`'s, keyed by the submodel's names."""
        params: dict[str, torch.Tensor] = {}
        for name, value in full_model.named_parameters():
            rel = text_name(name)
            target = self.plan.target_name(rel)
            if target is not None:
                params[MODEL_PREFIX + target] = self.plan.slice_tensor(rel, value)
        missing = self._expected - params.keys()
        if missing:
            raise RuntimeError(f"submodel parameters without a source: {sorted(missing)[:5]}")
        return params

    def __call__(self, full_model: torch.nn.Module, **kwargs: Any):
        """Run the submodel's forward on `full_model`'s sliced parameters; gradients reach `full_model`."""
        self.skeleton.train(full_model.training)
        return functional_call(self.skeleton, self.parameters_from(full_model), args=(), kwargs=kwargs)


def text_config(config: dict[str, Any]) -> TextConfig:
    return TextConfig.from_hf_dict(config)
