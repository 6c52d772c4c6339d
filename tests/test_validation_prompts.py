"""Validation prompts: their lengths cover the sliding window and, for chunked programs, more than one call."""

from __future__ import annotations

from g3n_export.validate import GREEDY_STEPS, validation_prompts

STREAM = list(range(10, 1010))


def lengths(prompts) -> dict[str, int]:
    return {p.name: len(p.tokens) for p in prompts}


def test_prompts_cover_the_window():
    prompts = validation_prompts(STREAM, bos_id=2, sliding_window=32, max_seq_len=512)
    assert lengths(prompts) == {"short": 8, "window": 32, "window+1": 33, "long": 96}
    assert all(p.tokens[0] == 2 for p in prompts)


def test_prompt_spans_several_calls():
    prompts = validation_prompts(STREAM, bos_id=2, sliding_window=32, max_seq_len=512, call_len=128)
    assert lengths(prompts)["calls"] == 128 + 32 + 1


def test_no_extra_prompt_when_long_spans_calls():
    prompts = validation_prompts(STREAM, bos_id=2, sliding_window=64, max_seq_len=512, call_len=128)
    assert "calls" not in lengths(prompts)
    assert lengths(prompts)["long"] == 192


def test_calls_prompt_needs_room_in_the_cache():
    max_seq_len = 128 + GREEDY_STEPS
    prompts = validation_prompts(STREAM, bos_id=2, sliding_window=32, max_seq_len=max_seq_len, call_len=128)
    assert "calls" not in lengths(prompts)
