"""Our decoder against transformers' Gemma3nForCausalLM (float32) on tiny checkpoints.

Every expected value comes from the transformers reference: full-sequence forwards without a cache.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_logits_close

from g3n_export.model import Gemma3nDecoder
from g3n_export.reference import reference_logits

MAX_SEQ_LEN = 64


def random_tokens(length: int, seed: int, vocab_size: int = 128) -> torch.Tensor:
    """Return `[1, length]` int64 ids over the whole vocabulary, so some lie outside the 96-row PLE table."""
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def prompt_lengths(window: int) -> dict[str, int]:
    return {"shorter": window - 1, "equal": window, "one_past": window + 1, "several": 3 * window + 2}


def run_chunks(model: Gemma3nDecoder, tokens: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed `tokens` through the static cache in chunks of the given sizes and concatenate the logits."""
    outputs, start = [], 0
    for size in sizes:
        outputs.append(model(tokens[:, start : start + size], torch.tensor([start])))
        start += size
    assert start == tokens.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.fixture(scope="module")
def models(tiny):
    return Gemma3nDecoder.from_checkpoint(tiny.checkpoint, max_seq_len=MAX_SEQ_LEN)


@pytest.mark.parametrize("length_case", ["shorter", "equal", "one_past", "several"])
def test_prefill_matches_reference(tiny, models, length_case):
    length = prompt_lengths(tiny.config.sliding_window)[length_case]
    tokens = random_tokens(length, seed=length)
    expected = reference_logits(tiny.reference, tokens)
    actual = models(tokens, torch.tensor([0]))
    assert_logits_close(actual, expected, f"{tiny.name} prefill {length_case} (T={length})", atol=tiny.atol)


def test_token_by_token_matches_reference(tiny, models):
    tokens = random_tokens(3 * tiny.config.sliding_window + 2, seed=7)
    expected = reference_logits(tiny.reference, tokens)
    actual = run_chunks(models, tokens, [1] * tokens.shape[1])
    assert_logits_close(actual, expected, f"{tiny.name} token by token", atol=tiny.atol)


def test_chunked_prefill_matches_reference(tiny, models):
    window = tiny.config.sliding_window
    # Chunks shorter than, equal to and longer than the window, starting at positions that wrap the ring.
    sizes = [window - 1, 1, window + 3, window, 2 * window + 1, 1]
    tokens = random_tokens(sum(sizes), seed=11)
    expected = reference_logits(tiny.reference, tokens)
    actual = run_chunks(models, tokens, sizes)
    assert_logits_close(actual, expected, f"{tiny.name} chunked prefill {sizes}", atol=tiny.atol)


def test_new_sequence_reuses_cache(tiny, models):
    # A second prompt from position 0 must not see the first prompt's keys left in the buffers.
    models(random_tokens(20, seed=3), torch.tensor([0]))
    tokens = random_tokens(9, seed=4)
    expected = reference_logits(tiny.reference, tokens)
    actual = run_chunks(models, tokens, [5, 1, 1, 1, 1])
    assert_logits_close(actual, expected, f"{tiny.name} second sequence in a used cache", atol=tiny.atol)


def test_greedy_decode_matches_reference(tiny, models):
    prompt = random_tokens(5, seed=5)
    # The 30-layer slice decodes fewer steps to keep the suite fast, and still crosses its window 8 three times.
    steps = 20 if tiny.config.num_hidden_layers > 20 else 50

    # Reference greedy continuation, one full-sequence forward per step.
    sequence = prompt
    expected_steps = []
    for _ in range(steps):
        last = reference_logits(tiny.reference, sequence)[:, -1]
        expected_steps.append(last)
        sequence = torch.cat((sequence, last.argmax(-1, keepdim=True)), dim=1)

    # Ours: prefill, then one token per step through the static cache.
    logits = models(prompt, torch.tensor([0]))[:, -1]
    worst = 0.0
    for step in range(steps):
        token = logits.argmax(-1, keepdim=True)
        expected_token = sequence[:, prompt.shape[1] + step : prompt.shape[1] + step + 1]
        assert torch.equal(token, expected_token), f"{tiny.name}: greedy token {step} is {token}, expected {expected_token}"
        worst = max(worst, assert_logits_close(logits, expected_steps[step], f"{tiny.name} decode step {step}", atol=tiny.atol))
        logits = models(token, torch.tensor([prompt.shape[1] + step]))[:, -1]
    print(f"{tiny.name} greedy decode, {steps} steps: max |Δ| = {worst:.3e}")


def test_functional_kv_matches_reference(tiny, models):
    functional = models.functional()
    window = tiny.config.sliding_window
    sizes = [2 * window + 1, 1, 1, window, 3]
    tokens = random_tokens(sum(sizes), seed=13)
    expected = reference_logits(tiny.reference, tokens)

    past_keys, past_values = functional.empty_past()
    outputs, start = [], 0
    for size in sizes:
        chunk = tokens[:, start : start + size]
        inputs_embeds, per_layer_tokens = models.embedder(chunk)
        positions = torch.arange(start, start + size)
        logits, past_keys, past_values = functional(inputs_embeds, per_layer_tokens, positions, past_keys, past_values)
        outputs.append(logits)
        start += size
        for k, v in zip(past_keys, past_values):
            assert k.shape == (1, tiny.config.num_key_value_heads, start, tiny.config.head_dim)
            assert v.shape == k.shape
    assert len(past_keys) == len(tiny.config.kv_layers)
    assert_logits_close(torch.cat(outputs, dim=1), expected, f"{tiny.name} functional past/present {sizes}", atol=tiny.atol)


def test_logits_to_keep_returns_the_last_positions(tiny):
    tokens = random_tokens(2 * tiny.config.sliding_window + 1, seed=21)
    full = Gemma3nDecoder.from_checkpoint(tiny.checkpoint, max_seq_len=MAX_SEQ_LEN)(tokens, torch.tensor([0]))
    last = Gemma3nDecoder.from_checkpoint(tiny.checkpoint, max_seq_len=MAX_SEQ_LEN)
    last.logits_to_keep = 3
    last_logits = last(tokens, torch.tensor([0]))
    assert last_logits.shape == (1, 3, full.shape[-1])
    torch.testing.assert_close(last_logits, full[:, -3:], rtol=0, atol=1e-6)
