"""Typed, validated view of a Gemma 3n text decoder configuration.

`TextConfig` is read from a Hugging Face `config.json`, either the multimodal `Gemma3nConfig` (text fields under
`text_config`) or a text-only `Gemma3nTextConfig`. It carries the per-layer facts every stage needs: attention type,
which layers own a KV cache and which producer each KV-shared layer reads, FFN width, activation sparsity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from g3n_export.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

TEXT_MODEL_TYPE = "gemma3n_text"
MULTIMODAL_MODEL_TYPE = "gemma3n"

# Defaults of transformers' Gemma3nTextConfig (the E4B values), used when config.json omits a field.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_400,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size": 2048,
    "hidden_size_per_layer_input": 256,
    "intermediate_size": 16_384,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32_768,
    "rms_norm_eps": 1e-6,
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "altup_active_idx": 0,
    "altup_coef_clip": 120.0,
    "altup_correct_scale": True,
    "altup_num_inputs": 4,
    "num_kv_shared_layers": 15,
    "laurel_rank": 64,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
_DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """Return Gemma 3n's pattern: four sliding-window layers, then one full-attention layer."""
    return tuple(FULL if (i + 1) % 5 == 0 else SLIDING for i in range(num_layers))


def default_sparsity(num_layers: int) -> tuple[float, ...]:
    """Return transformers' default: sparsity 0.95 on the first 10 layers when there are more than 10."""
    sparse = 10 if num_layers > 10 else 0
    return (0.95,) * sparse + (0.0,) * (num_layers - sparse)


@dataclass(frozen=True)
class TextConfig:
    """Gemma 3n text decoder hyperparameters, with per-layer lists expanded and checked.

    Field names follow transformers' `Gemma3nTextConfig`, so a reader can match them against `config.json`.
    """

    vocab_size: int
    vocab_size_per_layer_input: int
    hidden_size: int
    hidden_size_per_layer_input: int
    num_hidden_layers: int
    intermediate_size: tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_theta: dict[str, float]
    rms_norm_eps: float
    final_logit_softcapping: float | None
    altup_num_inputs: int
    altup_active_idx: int
    altup_coef_clip: float | None
    altup_correct_scale: bool
    laurel_rank: int
    activation_sparsity_pattern: tuple[float, ...]
    num_kv_shared_layers: int
    max_position_embeddings: int
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    kv_producer: tuple[int | None, ...] = field(init=False)

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise ConfigError("invalid Gemma 3n text config: " + "; ".join(errors))
        object.__setattr__(self, "kv_producer", _kv_producers(self))

    # Derived facts -------------------------------------------------------------------------------------------

    @property
    def first_kv_shared_layer(self) -> int:
        """Index of the first layer that reuses another layer's K/V (== num_hidden_layers when none do)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers that compute and cache their own K/V, in order."""
        return tuple(i for i in range(self.num_hidden_layers) if self.kv_producer[i] is None)

    def is_kv_shared(self, layer: int) -> bool:
        return self.kv_producer[layer] is not None

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def sparsity_z(self, layer: int) -> float | None:
        """Standard-normal quantile for the layer's Gaussian top-k sparsity, or None for a dense layer.

        Computed here as a Python float so that no `erfinv` or `torch.distributions` call reaches an exported graph.
        """
        s = self.activation_sparsity_pattern[layer]
        if s <= 0.0:
            return None
        return normal_icdf(s)

    @property
    def ple_width(self) -> int:
        """Columns of the PLE table: one `hidden_size_per_layer_input` slice per layer."""
        return self.num_hidden_layers * self.hidden_size_per_layer_input

    # Construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> TextConfig:
        """Build from the dict of a `config.json` (multimodal or text-only).

        Raises:
            ConfigError: the dict is not a Gemma 3n config, or its fields disagree with each other.
        """
        text = text_config_dict(config)
        get = lambda key: text.get(key, _HF_DEFAULTS.get(key))  # noqa: E731
        num_layers = _as_int(get("num_hidden_layers"), "num_hidden_layers")

        widths = get("intermediate_size")
        widths = tuple(widths) if isinstance(widths, (list, tuple)) else (widths,) * num_layers
        layer_types = text.get("layer_types")
        layer_types = tuple(layer_types) if layer_types is not None else default_layer_types(num_layers)
        sparsity = text.get("activation_sparsity_pattern")
        if sparsity is None:
            sparsity = default_sparsity(num_layers)
        elif not isinstance(sparsity, (list, tuple)):
            sparsity = (float(sparsity),) * num_layers
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))

        return cls(
            vocab_size=get("vocab_size"),
            vocab_size_per_layer_input=get("vocab_size_per_layer_input"),
            hidden_size=get("hidden_size"),
            hidden_size_per_layer_input=get("hidden_size_per_layer_input"),
            num_hidden_layers=num_layers,
            intermediate_size=widths,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            layer_types=layer_types,
            sliding_window=get("sliding_window"),
            rope_theta=_rope_thetas(text),
            rms_norm_eps=float(get("rms_norm_eps")),
            final_logit_softcapping=get("final_logit_softcapping"),
            altup_num_inputs=get("altup_num_inputs"),
            altup_active_idx=get("altup_active_idx"),
            altup_coef_clip=get("altup_coef_clip"),
            altup_correct_scale=bool(get("altup_correct_scale")),
            laurel_rank=get("laurel_rank"),
            activation_sparsity_pattern=tuple(float(s) for s in sparsity),
            num_kv_shared_layers=get("num_kv_shared_layers"),
            max_position_embeddings=get("max_position_embeddings"),
            hidden_activation=get("hidden_activation"),
            pad_token_id=get("pad_token_id") if get("pad_token_id") is not None else 0,
            bos_token_id=get("bos_token_id") if get("bos_token_id") is not None else 2,
            eos_token_ids=eos_ids,
        )


def text_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """Return the text decoder part of a Gemma 3n `config.json` dict.

    Raises:
        ConfigError: the config belongs to another model type.
    """
    model_type = config.get("model_type")
    if model_type == MULTIMODAL_MODEL_TYPE:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has model_type 'gemma3n' but no 'text_config' object")
        if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
            raise ConfigError(f"text_config.model_type is {text.get('model_type')!r}, expected 'gemma3n_text'")
        return text
    if model_type == TEXT_MODEL_TYPE:
        return config
    raise ConfigError(
        f"config.json has model_type {model_type!r}; g3n-export reads Gemma 3n checkpoints only "
        "(model_type 'gemma3n' or 'gemma3n_text')"
    )


def normal_icdf(p: float) -> float:
    """Standard-normal quantile Φ⁻¹(p), by Newton's method on math.erf (accurate to about 1e-15)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    x = 0.0
    for _ in range(100):
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        step = (cdf - p) / pdf
        x -= step
        if abs(step) < 1e-15:
            break
    return x


def _as_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"invalid Gemma 3n text config: {name} must be an integer, got {value!r}")
    return value


def _rope_thetas(text: dict[str, Any]) -> dict[str, float]:
    # transformers 5 writes rope_parameters[layer_type]; 4.x wrote rope_theta and rope_local_base_freq.
    thetas = dict(_DEFAULT_THETA)
    if "rope_theta" in text:
        thetas[FULL] = float(text["rope_theta"])
    if "rope_local_base_freq" in text:
        thetas[SLIDING] = float(text["rope_local_base_freq"])
    params = text.get("rope_parameters") or {}
    for layer_type in LAYER_TYPES:
        entry = params.get(layer_type)
        if isinstance(entry, dict) and "rope_theta" in entry:
            thetas[layer_type] = float(entry["rope_theta"])
            rope_type = entry.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(
                    f"invalid Gemma 3n text config: rope_parameters.{layer_type}.rope_type is {rope_type!r}; "
                    "only 'default' RoPE is supported"
                )
    return thetas


def _validate(c: TextConfig) -> list[str]:
    errors: list[str] = []
    n = c.num_hidden_layers
    for name in ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "hidden_size_per_layer_input",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                 "altup_num_inputs", "laurel_rank", "max_position_embeddings"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            errors.append(f"{name} must be a positive integer, got {value!r}")
    if errors:
        return errors

    for name in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
        if len(getattr(c, name)) != n:
            errors.append(f"{name} has {len(getattr(c, name))} entries, expected num_hidden_layers = {n}")
    bad_types = sorted({t for t in c.layer_types if t not in LAYER_TYPES})
    if bad_types:
        errors.append(f"layer_types contains {bad_types}; allowed values are {list(LAYER_TYPES)}")
    bad_widths = [(i, w) for i, w in enumerate(c.intermediate_size) if not isinstance(w, int) or w <= 0]
    if bad_widths:
        errors.append(f"intermediate_size must hold positive integers, got {bad_widths[:3]} at (layer, width)")
    bad_sparsity = [(i, s) for i, s in enumerate(c.activation_sparsity_pattern) if not 0.0 <= s < 1.0]
    if bad_sparsity:
        errors.append(f"activation_sparsity_pattern values must be in [0, 1), got {bad_sparsity[:3]}")
    if c.num_attention_heads % c.num_key_value_heads:
        errors.append(
            f"num_attention_heads ({c.num_attention_heads}) must be divisible by "
            f"num_key_value_heads ({c.num_key_value_heads})"
        )
    if c.vocab_size < c.vocab_size_per_layer_input:
        errors.append(
            f"vocab_size ({c.vocab_size}) must be at least vocab_size_per_layer_input "
            f"({c.vocab_size_per_layer_input})"
        )
    if not 0 <= c.altup_active_idx < c.altup_num_inputs:
        errors.append(f"altup_active_idx ({c.altup_active_idx}) must be below altup_num_inputs ({c.altup_num_inputs})")
    if c.hidden_activation != "gelu_pytorch_tanh":
        errors.append(f"hidden_activation is {c.hidden_activation!r}; Gemma 3n uses 'gelu_pytorch_tanh'")
    if not 0 <= c.num_kv_shared_layers < n:
        errors.append(f"num_kv_shared_layers ({c.num_kv_shared_layers}) must be in [0, num_hidden_layers = {n})")
    if errors:
        return errors

    # Every attention type used by a KV-shared layer needs a producer: the last non-shared layer of that type.
    first_shared = n - c.num_kv_shared_layers
    owned = set(c.layer_types[:first_shared])
    missing = sorted(set(c.layer_types[first_shared:]) - owned)
    if missing:
        errors.append(
            f"KV-shared layers {first_shared}..{n - 1} need a KV producer of type {missing} before layer "
            f"{first_shared}, but none of layers 0..{first_shared - 1} has that type (check layer_types and "
            "num_kv_shared_layers; a MatFormer slice must keep the reserved producer layers)"
        )
    return errors


def _kv_producers(c: TextConfig) -> tuple[int | None, ...]:
    # Same rule as transformers 5 (`kv_sharing_modes`), the JAX reference and llama.cpp: a shared layer reads the
    # K/V of the last non-shared layer of its own attention type.
    first_shared = c.first_kv_shared_layer
    last_of_type = {t: i for i, t in enumerate(c.layer_types[:first_shared])}
    return tuple(None if i < first_shared else last_of_type[c.layer_types[i]] for i in range(c.num_hidden_layers))
