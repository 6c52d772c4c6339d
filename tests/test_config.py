"""TextConfig: derived layer facts and rejection of inconsistent configs."""

import math

import pytest
from transformers import Gemma3nTextConfig

from g3n_export.config import FULL, SLIDING, TextConfig, normal_icdf
from g3n_export.errors import ConfigError


def e4b_dict(**overrides):
    return {"model_type": "gemma3n_text", **overrides}


def test_e4b_defaults_match_transformers():
    hf = Gemma3nTextConfig()
    ours = TextConfig.from_hf_dict(hf.to_dict())
    assert ours.num_hidden_layers == 35
    assert list(ours.layer_types) == hf.layer_types
    assert list(ours.intermediate_size) == hf.intermediate_size
    assert list(ours.activation_sparsity_pattern) == hf.activation_sparsity_pattern
    assert ours.rope_theta == {SLIDING: 10_000.0, FULL: 1_000_000.0}


def test_kv_producers_follow_transformers_sharing_modes():
    for layers, shared in ((35, 15), (30, 10), (10, 5), (7, 2)):
        hf = Gemma3nTextConfig(num_hidden_layers=layers, num_kv_shared_layers=shared,
                               intermediate_size=[8] * layers, activation_sparsity_pattern=[0.0] * layers)
        ours = TextConfig.from_hf_dict(hf.to_dict())
        modes = hf.kv_sharing_modes
        stores = [i for i, m in enumerate(modes) if m == "store"]
        # transformers marks a "store" layer for every attention type, even one no shared layer reads.
        assert {p for p in ours.kv_producer if p is not None} <= set(stores)
        assert [i for i, m in enumerate(modes) if m == "reuse"] == [i for i in range(layers) if ours.is_kv_shared(i)]
        for i in range(layers):
            if ours.is_kv_shared(i):
                assert ours.layer_types[ours.kv_producer[i]] == ours.layer_types[i]


def test_e4b_kv_plan():
    c = TextConfig.from_hf_dict(e4b_dict())
    assert c.kv_layers == tuple(range(20))
    assert [c.kv_producer[i] for i in (20, 23, 24, 29, 33, 34)] == [18, 18, 19, 19, 18, 19]


def test_sparsity_z_is_python_float():
    c = TextConfig.from_hf_dict(e4b_dict())
    z = c.sparsity_z(0)
    assert isinstance(z, float)
    assert z == pytest.approx(1.6448536269514722, abs=1e-12)
    assert c.sparsity_z(10) is None


def test_normal_icdf_matches_erf_inverse():
    for p in (0.01, 0.5, 0.9, 0.95, 0.999):
        x = normal_icdf(p)
        assert 0.5 * (1 + math.erf(x / math.sqrt(2))) == pytest.approx(p, abs=1e-14)


def test_legacy_rope_keys():
    c = TextConfig.from_hf_dict(e4b_dict(rope_theta=5e5, rope_local_base_freq=2e4))
    assert c.rope_theta == {FULL: 5e5, SLIDING: 2e4}


def test_multimodal_wrapper_reads_text_config():
    c = TextConfig.from_hf_dict({"model_type": "gemma3n", "text_config": {"model_type": "gemma3n_text",
                                                                          "num_hidden_layers": 10,
                                                                          "num_kv_shared_layers": 5}})
    assert c.num_hidden_layers == 10
    assert c.kv_layers == (0, 1, 2, 3, 4)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"layer_types": ["sliding_attention"] * 34}, "layer_types has 34 entries"),
        ({"intermediate_size": [64] * 30}, "intermediate_size has 30 entries"),
        ({"activation_sparsity_pattern": [0.0] * 3}, "activation_sparsity_pattern has 3 entries"),
        ({"layer_types": ["sliding_attention"] * 34 + ["global"]}, "layer_types contains ['global']"),
        ({"num_attention_heads": 3}, "num_attention_heads (3) must be divisible"),
        ({"num_kv_shared_layers": 35}, "num_kv_shared_layers (35)"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
    ],
)
def test_invalid_config_names_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        TextConfig.from_hf_dict(e4b_dict(**overrides))
    assert field in str(err.value)


def test_missing_kv_producer_rejected():
    # Layers 0-3 are sliding and 4 is full; with 1 unshared layer no full-attention producer exists.
    with pytest.raises(ConfigError) as err:
        TextConfig.from_hf_dict(e4b_dict(num_hidden_layers=5, num_kv_shared_layers=4, intermediate_size=8))
    assert "need a KV producer of type ['full_attention']" in str(err.value)


def test_other_model_type_rejected():
    with pytest.raises(ConfigError) as err:
        TextConfig.from_hf_dict({"model_type": "llama"})
    assert "'llama'" in str(err.value)
    assert "Gemma 3n" in str(err.value)
