"""Structure of the decoder: KV storage, PLE lookup, weight loading, and a reduced-precision run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from helpers import assert_logits_close, max_abs_diff
from test_model_parity import random_tokens

from g3n_export.errors import CheckpointError
from g3n_export.layout import is_unused_kv_name, layer_index
from g3n_export.model import Gemma3nDecoder, PerLayerEmbedding, hf_name_map
from g3n_export.model.kv_cache import FullLayerCache, RingLayerCache
from g3n_export.reference import reference_logits

MODEL_DIR = Path(__file__).parents[1] / "g3n_export" / "model"


def text_state_dict(tiny) -> dict[str, torch.Tensor]:
    return {name: tiny.checkpoint.text_tensor(name).clone() for name in tiny.checkpoint.text_names()}


def test_kv_buffers_only_for_kv_layers(tiny):
    model = Gemma3nDecoder.from_checkpoint(tiny.checkpoint, max_seq_len=24)
    config = tiny.config
    assert len(model.kv_cache.layers) == len(config.kv_layers)
    assert len(config.kv_layers) < config.num_hidden_layers

    buffers = [name for name, _ in model.named_buffers() if name.endswith(("k_cache", "v_cache"))]
    assert len(buffers) == 2 * len(config.kv_layers)
    for layer, cache in zip(config.kv_layers, model.kv_cache.layers):
        if config.is_sliding(layer):
            assert isinstance(cache, RingLayerCache)
            assert cache.k_cache.shape[2] == min(config.sliding_window, 24)
        else:
            assert isinstance(cache, FullLayerCache)
            assert cache.k_cache.shape[2] == 24


def test_kv_shared_layers_have_no_kv_projections(tiny):
    model = Gemma3nDecoder.from_checkpoint(tiny.checkpoint, max_seq_len=8)
    for i, layer in enumerate(model.stack.layers):
        has_kv = hasattr(layer.self_attn, "k_proj")
        assert has_kv == (not tiny.config.is_kv_shared(i)), f"layer {i}"


def test_ple_out_of_table_ids_read_row_zero(text7):
    config = text7.config
    tokens = torch.tensor([[0, 5, config.vocab_size_per_layer_input - 1, config.vocab_size_per_layer_input,
                            config.vocab_size - 1, -3]])
    model = Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=8)
    ple = model.embedder.per_layer_embedding
    assert isinstance(ple, PerLayerEmbedding)
    out = ple(tokens)  # shape: [1, 6, L, P]
    assert out.shape == (1, 6, config.num_hidden_layers, config.hidden_size_per_layer_input)
    for column in (3, 4, 5):
        assert torch.equal(out[0, column], out[0, 0]), f"id {tokens[0, column].item()} does not read PLE row 0"
    assert not torch.equal(out[0, 1], out[0, 0])

    expected = text7.reference.model.get_per_layer_inputs(tokens)
    assert max_abs_diff(out, expected) == 0.0


def test_embedder_matches_reference_embeddings(text7):
    model = Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=8)
    tokens = random_tokens(10, seed=31)
    inputs_embeds, per_layer_tokens = model.embedder(tokens)
    assert max_abs_diff(inputs_embeds, text7.reference.model.embed_tokens(tokens)) == 0.0
    assert max_abs_diff(per_layer_tokens, text7.reference.model.get_per_layer_inputs(tokens)) == 0.0


def test_lm_head_tied_to_token_embedding(text7):
    model = Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=8)
    assert model.stack.lm_head.weight is model.embedder.token_embedding.weight
    assert isinstance(model.stack.lm_head, torch.nn.Linear)


def test_unused_kv_weights_never_read(text7):
    weights = text_state_dict(text7)
    unused = [n for n in weights if is_unused_kv_name(n) and text7.config.is_kv_shared(layer_index(n))]
    assert unused
    tokens = random_tokens(9, seed=32)
    expected = reference_logits(text7.reference, tokens)

    poisoned = {n: (torch.full_like(t, float("nan")) if n in unused else t) for n, t in weights.items()}
    model = Gemma3nDecoder.from_hf_state_dict(text7.config, poisoned, max_seq_len=16)
    assert_logits_close(model(tokens, torch.tensor([0])), expected, "NaN in unused KV weights")

    dropped = {n: t for n, t in weights.items() if n not in unused}
    model = Gemma3nDecoder.from_hf_state_dict(text7.config, dropped, max_seq_len=16)
    assert_logits_close(model(tokens, torch.tensor([0])), expected, "unused KV weights dropped")


def test_missing_tensor_raises(text7):
    weights = text_state_dict(text7)
    del weights["layers.2.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="layers.2.mlp.up_proj.weight"):
        Gemma3nDecoder.from_hf_state_dict(text7.config, weights, max_seq_len=8)


def test_wrong_shape_raises(text7):
    weights = text_state_dict(text7)
    weights["norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="norm.weight"):
        Gemma3nDecoder.from_hf_state_dict(text7.config, weights, max_seq_len=8)


def test_name_map_covers_every_parameter(tiny):
    model = Gemma3nDecoder.from_checkpoint(tiny.checkpoint, max_seq_len=8)
    mapping = hf_name_map(tiny.config)
    parameters = {name for name, _ in model.named_parameters()}
    assert parameters == set(mapping)
    assert len(set(mapping.values())) == len(mapping)


def test_reference_loads_checkpoint_values(tiny):
    for name in ("embed_tokens.weight", "layers.0.altup.prediction_coefs.weight", "norm.weight"):
        loaded = dict(tiny.reference.model.named_parameters())[name]
        assert torch.equal(loaded, tiny.checkpoint.text_tensor(name)), name


def test_input_past_max_seq_len_raises(text7):
    model = Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len 8"):
        model(random_tokens(3, seed=1), torch.tensor([6]))


def test_bfloat16_as_accurate_as_reference_bfloat16(text7):
    # With float32 islands, our bfloat16 logits must be about as close to the float32 reference as transformers'
    # own bfloat16 run is (1.5x slack for different rounding points), and finite.
    tokens = random_tokens(12, seed=33)
    expected = reference_logits(text7.reference, tokens)
    reference_bf16 = copy.deepcopy(text7.reference).to(torch.bfloat16)
    reference_error = max_abs_diff(reference_logits(reference_bf16, tokens), expected)

    model = Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=16, dtype=torch.bfloat16)
    logits = model(tokens, torch.tensor([0]))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    error = max_abs_diff(logits, expected)
    print(f"bfloat16 max |Δ| vs float32 reference: ours {error:.3e}, transformers {reference_error:.3e}")
    assert error <= 1.5 * reference_error


def test_model_code_has_no_export_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(executorch|onnx\w*|torchao|torch\.export|torch\.onnx)\b", re.M)
    for path in MODEL_DIR.glob("*.py"):
        assert not pattern.search(path.read_text()), f"{path.name} imports an export or quantization package"
