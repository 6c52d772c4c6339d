"""Tiny synthetic Gemma 3n checkpoints in the Hugging Face layout, and comparison helpers, for tests.

Weights are random with a fixed seed. Every tensor is perturbed, norms and AltUp coefficients included, so that a
wrong formula changes the logits. The AltUp coefficients stay small (std 0.05) so the streams stay well scaled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from g3n_export.checkpoint import TensorSpec, write_checkpoint
from g3n_export.config import TextConfig
from g3n_export.layout import TEXT_PREFIX, text_shapes

# Float32 logits (magnitude up to about 10) of our model and transformers differ by up to about 3e-5 on these tiny
# models: the two implementations sum in different orders (AltUp as explicit weighted sums, attention over a ring
# buffer or a static cache), and the per-layer norms and AltUp rescaling carry a few ulps of difference through the
# layers. 1e-4 leaves room for that rounding, while a wrong formula moves logits by 1e-2 or more.
LOGITS_ATOL = 1e-4
# The 30-layer slice (`sliced_checkpoint`) carries rounding through the most layers. On an Intel Xeon with AVX-512, in
# a chunked prefill, the reference's float32 logits differ from its float64 logits by 7.1e-5, ours by 4.2e-5, and the
# two float32 results from each other by 1.1e-4. 2.5e-4 covers that rounding; a wrong formula moves them by 1e-2.
SLICED_LOGITS_ATOL = 2.5e-4

# Stand-ins for the vision/audio tensors of a multimodal checkpoint, which the text decoder must ignore.
TOWER_TENSORS = {
    "model.vision_tower.timm_model.conv_stem.conv.weight": (4, 3, 3, 3),
    "model.audio_tower.subsample_conv_projection.input_proj_linear.weight": (8, 8),
    "model.embed_vision.embedding.weight": (4, 32),
    "model.embed_audio.embedding.weight": (4, 32),
}


def tiny_text_config(
    num_layers: int = 7,
    *,
    sliding_window: int = 4,
    num_kv_shared_layers: int = 2,
    intermediate_size: int | list[int] | None = None,
    sparsity: list[float] | None = None,
    layer_types: list[str] | None = None,
    max_position_embeddings: int = 256,
    rope_theta_sliding: float = 100.0,
    rope_theta_full: float = 10_000.0,
) -> dict[str, Any]:
    """Return a `gemma3n_text` config dict with tiny widths (d=32, 2 query heads, 1 KV head, head_dim 16).

    The vocabulary (128) is larger than the PLE table (96), as in the released models, and the RoPE thetas are small
    so that positions in short tests rotate noticeably.
    """
    if intermediate_size is None:
        intermediate_size = [64 - 8 * (i % 3) for i in range(num_layers)]  # non-uniform MatFormer widths
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(num_layers)]
    if sparsity is None:
        sparsity = [0.95 if i < 2 else 0.0 for i in range(num_layers)]
    return {
        "model_type": "gemma3n_text",
        "vocab_size": 128,
        "vocab_size_per_layer_input": 96,
        "hidden_size": 32,
        "hidden_size_per_layer_input": 8,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "layer_types": layer_types,
        "sliding_window": sliding_window,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": rope_theta_sliding},
            "full_attention": {"rope_type": "default", "rope_theta": rope_theta_full},
        },
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "altup_num_inputs": 4,
        "altup_active_idx": 0,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "laurel_rank": 4,
        "activation_sparsity_pattern": sparsity,
        "num_kv_shared_layers": num_kv_shared_layers,
        "max_position_embeddings": max_position_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "tie_word_embeddings": True,
    }


def multimodal_config(text_config: dict[str, Any]) -> dict[str, Any]:
    """Wrap a text config the way the released `Gemma3nConfig` checkpoints do."""
    return {
        "model_type": "gemma3n",
        "architectures": ["Gemma3nForConditionalGeneration"],
        "text_config": dict(text_config),
    }


def random_text_tensor(
    name: str, shape: tuple[int, ...], generator: torch.Generator, qk_norm_scale: float = 1.0
) -> torch.Tensor:
    """Return a random tensor for one checkpoint text tensor, scaled to keep a tiny model's activations sane.

    `qk_norm_scale` multiplies the q_norm/k_norm weights. Below 1 it softens the attention (the scale is 1.0).
    """
    noise = torch.randn(shape, generator=generator)
    if name.endswith(("altup.prediction_coefs.weight", "altup.correction_coefs.weight")):
        return 0.05 * noise
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return qk_norm_scale * (1.0 + 0.2 * noise)
    if len(shape) == 1:  # norm weights and correct_output_scale multiply directly
        return 1.0 + 0.2 * noise
    if name in ("embed_tokens.weight", "embed_tokens_per_layer.weight"):
        return 0.3 * noise
    return noise / math.sqrt(shape[1])  # a linear layer's [out, in] weight


def random_text_weights(config: TextConfig, seed: int = 0, qk_norm_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Return every checkpoint text tensor (KV-shared layers' unused k/v included), keyed by its relative name."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: random_text_tensor(name, shape, generator, qk_norm_scale) for name, shape in text_shapes(config).items()
    }


def write_tiny_checkpoint(
    path: Path,
    config_dict: dict[str, Any],
    *,
    seed: int = 0,
    qk_norm_scale: float = 1.0,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `config_dict` and random float32 weights as a safetensors checkpoint folder.

    A multimodal config gets its text tensors under `model.language_model.` plus stand-in tower tensors. A text-only
    config gets them under `model.`, as `Gemma3nForCausalLM.save_pretrained` writes them.
    """
    config = TextConfig.from_hf_dict(config_dict)
    multimodal = config_dict["model_type"] == "gemma3n"
    if weights is None:
        weights = random_text_weights(config, seed, qk_norm_scale)
    prefix = TEXT_PREFIX if multimodal else "model."
    tensors = {prefix + name: t for name, t in weights.items()}
    if multimodal:
        generator = torch.Generator().manual_seed(seed + 1)
        tensors.update({name: torch.randn(shape, generator=generator) for name, shape in TOWER_TENSORS.items()})

    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return write_checkpoint(Path(path), config_dict, specs, lambda spec: tensors[spec.name].contiguous())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, case: str, atol: float = LOGITS_ATOL) -> float:
    """Assert elementwise closeness of two logits tensors, print the max |Δ| and return it."""
    assert actual.shape == expected.shape, f"{case}: shape {list(actual.shape)} != {list(expected.shape)}"
    diff = max_abs_diff(actual, expected)
    print(f"{case}: max |Δ| = {diff:.3e}")
    assert diff <= atol, f"{case}: max |Δ| = {diff:.3e} exceeds atol {atol:.0e}"
    return diff


def sliced_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a 30-layer MatFormer slice of a tiny E4B-structured 35-layer model (layers 20-24 skipped).

    The source has E4B's block pattern, 15 KV-shared layers and sparsity on layers 0-9. The slice keeps non-uniform
    FFN prefixes, so it exercises skipped layers, a shorter KV-shared region and renumbered layers.

    A 30-layer random model is numerically chaotic with sharp attention and 95 % sparsity over 32-64 FFN lanes: the
    reference's own float32 and float64 logits then differ by 2e-2. Softer attention (q/k norm weights x0.3) and
    sparsity 0.6 bring that to about 7e-5, so a float32 comparison at `SLICED_LOGITS_ATOL` tests the formulas, not
    the rounding.
    """
    from g3n_export.matformer import make_plan

    source_dict = tiny_text_config(
        35, sliding_window=8, num_kv_shared_layers=15, intermediate_size=64, sparsity=[0.6] * 10 + [0.0] * 25
    )
    source = TextConfig.from_hf_dict(source_dict)
    widths = [32 + 8 * (i % 5) for i in range(30)]
    plan = make_plan(source, list(range(20, 25)), widths)
    sliced = {}
    for name, tensor in random_text_weights(source, seed, qk_norm_scale=0.3).items():
        new_name = plan.target_name(name)
        if new_name is not None:
            sliced[new_name] = plan.slice_tensor(name, tensor).contiguous()
    return write_tiny_checkpoint(path, plan.config_dict(source_dict), weights=sliced)


# The bundled trained model ---------------------------------------------------------------------------------------------

def bundled_source(size: str | None = None):
    """Open the bundled model, sliced by the size recipe `size` when given, and load its transformers reference.

    Returns (source, reference). The model ships with the package, so a missing file is an error, not a skip.
    """
    from g3n_export.bundled import BUNDLED_MODEL
    from g3n_export.checkpoint import open_checkpoint
    from g3n_export.matformer import SlicedCheckpoint
    from g3n_export.recipes import load_size_recipe
    from g3n_export.validate import load_reference_model

    assert (BUNDLED_MODEL / "config.json").is_file(), f"the bundled model is missing from {BUNDLED_MODEL}"
    source = open_checkpoint(BUNDLED_MODEL)
    if size is not None:
        source = SlicedCheckpoint(source, load_size_recipe(size).plan(source.text_config))
    return source, load_reference_model(source)


def bundled_heldout_windows(count: int, seq_len: int = 128) -> list[list[int]]:
    """Token ids of the bundled model's first `count` held-out windows, each `<bos>` and up to seq_len - 1 tokens."""
    from g3n_export.bundled import BUNDLED_MODEL
    from g3n_export.tokenizer import load_sentencepiece
    from g3n_export.training.corpus import read_heldout
    from g3n_export.training.evaluate import heldout_windows

    texts = read_heldout((BUNDLED_MODEL / "heldout.json").read_text())
    return heldout_windows(load_sentencepiece(BUNDLED_MODEL), texts, seq_len)[:count]
