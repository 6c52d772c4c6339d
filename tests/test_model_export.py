"""`torch.export` (strict, dynamic sequence length) of the static-cache decoder, and the exported graph's contents."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_logits_close
from test_model_parity import random_tokens, run_chunks

from g3n_export.model import Gemma3nDecoder
from g3n_export.reference import reference_logits

MAX_SEQ_LEN = 40
FORBIDDEN_OPS = ("erfinv", "_is_all_true")  # what torch.distributions.Normal.icdf leaves in a graph


@pytest.fixture(scope="module")
def eager(text7):
    return Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def exported_program(text7):
    model = Gemma3nDecoder.from_checkpoint(text7.checkpoint, max_seq_len=MAX_SEQ_LEN)
    seq_len = torch.export.Dim("seq_len", min=1, max=MAX_SEQ_LEN)
    example = (torch.zeros(1, 5, dtype=torch.int64), torch.tensor([0]))
    return torch.export.export(
        model, example, dynamic_shapes={"tokens": {1: seq_len}, "input_pos": None}, strict=True
    )


@pytest.fixture(scope="module")
def exported(exported_program):
    return exported_program.module()


@pytest.fixture(scope="module")
def decomposed_program(exported_program):
    """The program in the core ATen opset, with in-place buffer updates turned into mutation outputs."""
    return exported_program.run_decompositions()


@pytest.mark.parametrize("length", [1, 3, 4, 5, 14, MAX_SEQ_LEN])
def test_exported_prefill_matches_eager(text7, eager, exported, length):
    tokens = random_tokens(length, seed=100 + length)
    expected = eager(tokens, torch.tensor([0]))
    assert_logits_close(exported(tokens, torch.tensor([0])), expected, f"exported vs eager prefill T={length}")
    reference = reference_logits(text7.reference, tokens)
    assert_logits_close(exported(tokens, torch.tensor([0])), reference, f"exported vs reference prefill T={length}")


def test_exported_token_by_token_matches_eager(text7, eager, exported):
    tokens = random_tokens(14, seed=21)
    expected = run_chunks(eager, tokens, [1] * 14)
    actual = run_chunks(exported, tokens, [1] * 14)
    assert_logits_close(actual, expected, "exported vs eager token by token")
    assert_logits_close(actual, reference_logits(text7.reference, tokens), "exported vs reference token by token")


def test_exported_chunked_prefill_matches_eager(text7, eager, exported):
    sizes = [3, 1, 7, 4, 9, 1, 2]
    tokens = random_tokens(sum(sizes), seed=22)
    expected = run_chunks(eager, tokens, sizes)
    actual = run_chunks(exported, tokens, sizes)
    assert_logits_close(actual, expected, f"exported vs eager chunked {sizes}")
    assert_logits_close(actual, reference_logits(text7.reference, tokens), f"exported vs reference chunked {sizes}")


def test_exported_graph_has_no_forbidden_ops(exported_program, decomposed_program):
    """A failure means an `erfinv` or a `torch.distributions` call reached forward. Precompute such constants as Python floats."""
    for program in (exported_program, decomposed_program):
        targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        for forbidden in FORBIDDEN_OPS:
            found = [t for t in targets if forbidden in t]
            assert not found, f"exported graph calls {found}"
        traces = [node.meta.get("stack_trace") or "" for node in program.graph.nodes]
        assert not any("distributions" in trace for trace in traces), "exported graph traces into torch.distributions"


def test_exported_graph_mutates_only_kv_cache(text7, decomposed_program):
    signature = decomposed_program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    kv_buffers = {
        name for name in signature.buffers if name.startswith("kv_cache.") and name.endswith(("k_cache", "v_cache"))
    }
    assert len(kv_buffers) == 2 * len(text7.config.kv_layers)
    assert mutated == kv_buffers
    assert not mutated & set(signature.parameters)
    assert not signature.user_inputs_to_mutate
