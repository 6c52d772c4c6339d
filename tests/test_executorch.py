"""ExecuTorch target: exported programs run on the real ExecuTorch runtime against the transformers reference.

Each program is exported once per module. The float program comes from a tiny random checkpoint with 4 layers
(sliding, full, and two KV-shared layers reading them) and a vocabulary from a small SentencePiece tokenizer trained
here, so ExecuTorch's own LLM runner can tokenize for it. The quantized program comes from the E2B slice of the bundled
trained model, because a random model's near-tied logits show little of the quantization error.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_logits_close,
    bundled_heldout_windows,
    bundled_source,
    tiny_text_config,
    write_tiny_checkpoint,
)

from g3n_export.bundled import BUNDLED_MODEL
from g3n_export.checkpoint import open_checkpoint
from g3n_export.parity import compare_logits
from g3n_export.quantize import TABLE_BITS, quantize_table
from g3n_export.reference import load_reference, reference_logits
from g3n_export.runtime.executorch import ExecuTorchRunner, planned_buffer_sizes
from g3n_export.targets.executorch import QuantizedPerLayerEmbedding, export_executorch
from g3n_export.targets.recipe import ExecuTorchSpec

MAX_SEQ_LEN = 48
SLIDING_WINDOW = 4
TOKENIZER_VOCAB = 512
EXTRA_VOCAB = 16  # embedding rows past the PLE table, as the released models' multimodal ids

# Calls of at most 4 tokens, so that longer prefills (ours and ExecuTorch's LLM runner's) are split into calls.
PREFILL_CHUNK = 4
FLOAT = ExecuTorchSpec(linear="fp32", group_size=32, embedding="fp32", ple="fp32", prefill_chunk=PREFILL_CHUNK)

# Quantized programs of the bundled model's E2B slice. Each lowering takes about 11 minutes on 2 cores, so this module
# lowers only the all-8-bit program. tests/test_pipeline.py checks the held-out fidelity of the android recipe's
# program (8da4w linears and LM head, int8 token embedding, int4 PLE table), which the CLI exports there.
BUNDLED_SEQ_LEN = 128
BUNDLED_SPECS = {
    "int8": ExecuTorchSpec(linear="8da8w", group_size=32, embedding="int8", ple="int8", lm_head="8da8w"),
}
HELDOUT_WINDOWS = 4  # windows of up to BUNDLED_SEQ_LEN held-out tokens
# (min top-1 agreement, max mean KL in nats) against transformers float32 on the held-out windows. Measured: top-1
# 0.9915, mean KL 5.0e-4 over 117 positions. The bars leave 2 positions on top-1 and 10x on KL.
BUNDLED_BARS = {"int8": (0.97, 0.005)}

# Float32 logits of the program and of transformers differ by rounding only. XNNPACK's vectorized kernels (float GEMM
# with another summation order, polynomial tanh/exp/GELU) moved these random tiny-model logits by up to 4.3e-3
# (measured, prefill of 48 tokens), while the same program without XNNPACK matched to 7.7e-5; a wrong formula moves
# them by far more than 1e-2.
# NOTE: the bound comes from this random model, whose activations amplify rounding; the bundled model is unmeasured.
FLOAT_ATOL = 1e-2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    import pydoc_data.topics

    from g3n_export.tokenizer import train_sentencepiece, write_tokenizer_files

    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)[:20]]
    write_tokenizer_files(train_sentencepiece(texts, TOKENIZER_VOCAB), folder)
    return folder


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, tokenizer_dir):
    config = tiny_text_config(
        4, sliding_window=SLIDING_WINDOW, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sparsity=[0.95, 0.0, 0.0, 0.0],
    )
    config["vocab_size_per_layer_input"] = TOKENIZER_VOCAB
    config["vocab_size"] = TOKENIZER_VOCAB + EXTRA_VOCAB
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny4") / "checkpoint", config, seed=3, qk_norm_scale=0.5)
    for name in ("tokenizer.json", "tokenizer.model"):
        (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    checkpoint = open_checkpoint(path)
    return checkpoint, load_reference(checkpoint)


def _print_export(spec: ExecuTorchSpec, result) -> None:
    stages = ", ".join(f"{s.name} {s.seconds:.1f} s" for s in result.stages)
    print(f"{spec}: pte {result.pte_bytes} B, ptd {result.ptd_bytes} B, peak RSS "
          f"{result.stages[-1].peak_rss_bytes / 2**20:.0f} MiB; {stages}; {result.schemes}")


def _export(checkpoint, spec: ExecuTorchSpec, out: Path):
    result = export_executorch(checkpoint, out, spec, MAX_SEQ_LEN, bos_id=2, eos_ids=[1])
    _print_export(spec, result)
    return result


@pytest.fixture(scope="module")
def float_export(tiny4, tmp_path_factory):
    return _export(tiny4[0], FLOAT, tmp_path_factory.mktemp("et_fp32"))


@pytest.fixture(scope="module")
def float_runner(float_export):
    return ExecuTorchRunner(float_export.pte_path, float_export.ptd_path)


def tokens_for(length: int, seed: int) -> torch.Tensor:
    """Return `[1, length]` ids over the whole vocabulary, so some lie past the PLE table."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TOKENIZER_VOCAB + EXTRA_VOCAB, (1, length), generator=generator)


# Float program -------------------------------------------------------------------------------------------------------


def test_program_returns_last_position_only(float_runner, float_export):
    """The default program plans a `[1, 1, V]` logits buffer and returns the last position of a multi-token call."""
    sizes = float_runner.module.method_meta("forward").output_tensor_meta(0).sizes()
    assert list(sizes) == [1, 1, float_runner.vocab_size]
    assert not float_runner.all_logits
    assert float_runner.forward(tokens_for(PREFILL_CHUNK, seed=1), 0).shape == (1, 1, float_runner.vocab_size)


@pytest.mark.parametrize("length", [1, SLIDING_WINDOW + 1, 3 * SLIDING_WINDOW + 2, MAX_SEQ_LEN])
def test_float_prefill_matches_reference(tiny4, float_runner, length):
    # One prefill per position, on the prefix that ends there, in calls of PREFILL_CHUNK tokens: the program returns
    # the last position only.
    tokens = tokens_for(length, seed=length)
    expected = reference_logits(tiny4[1], tokens)
    assert_logits_close(float_runner.prefill_logits(tokens), expected, f"prefill T={length}", atol=FLOAT_ATOL)


def test_float_token_by_token_matches_reference(tiny4, float_runner):
    tokens = tokens_for(3 * SLIDING_WINDOW + 3, seed=11)
    expected = reference_logits(tiny4[1], tokens)
    actual = float_runner.logits(tokens, chunk_sizes=[1] * tokens.shape[1])
    assert_logits_close(actual, expected, "token by token", atol=FLOAT_ATOL)


def test_float_chunked_prefill_matches_reference(tiny4, float_runner):
    sizes = [5, 1, 9, 2, 6]
    tokens = tokens_for(sum(sizes), seed=12)
    expected = reference_logits(tiny4[1], tokens)
    chunk_ends = [sum(sizes[:i + 1]) - 1 for i in range(len(sizes))]
    actual = float_runner.logits(tokens, chunk_sizes=sizes)
    assert_logits_close(actual, expected[:, chunk_ends], f"chunks {sizes}", atol=FLOAT_ATOL)


def test_all_logits_program_matches_reference(tiny4, tmp_path):
    """With `logits = "all"` one prefill call returns every position's logits, here in one call of MAX_SEQ_LEN."""
    result = _export(tiny4[0], dataclasses.replace(FLOAT, logits="all", prefill_chunk=MAX_SEQ_LEN), tmp_path)
    runner = ExecuTorchRunner(result.pte_path, result.ptd_path)
    tokens = tokens_for(3 * SLIDING_WINDOW + 2, seed=13)
    assert runner.all_logits
    assert runner.max_call_len == MAX_SEQ_LEN
    assert_logits_close(runner.forward(tokens, 0), reference_logits(tiny4[1], tokens), "all-logits prefill",
                        atol=FLOAT_ATOL)


def test_runner_metadata(tiny4, float_runner):
    config = tiny4[0].text_config
    # ExecuTorch's LLM runner reads get_max_seq_len as the maximum tokens per call, get_max_context_len as the cache.
    assert float_runner.metadata["get_max_seq_len"] == PREFILL_CHUNK
    assert float_runner.metadata["get_max_context_len"] == MAX_SEQ_LEN
    assert float_runner.metadata["get_vocab_size"] == config.vocab_size
    assert float_runner.metadata["get_n_layers"] == config.num_hidden_layers
    assert float_runner.metadata["get_bos_id"] == 2
    assert float_runner.eos_ids == {1}
    assert bool(float_runner.metadata["use_kv_cache"])
    assert bool(float_runner.metadata["enable_dynamic_shape"])


def test_forward_rejects_overflowing_positions(float_runner):
    with pytest.raises(ValueError, match="KV cache of 48 positions"):
        float_runner.forward(torch.zeros(1, 2, dtype=torch.int64), MAX_SEQ_LEN - 1)
    with pytest.raises(ValueError, match="KV cache of 48 positions"):
        float_runner.prefill(torch.zeros(1, MAX_SEQ_LEN + 1, dtype=torch.int64))


def test_forward_rejects_long_call(float_runner):
    with pytest.raises(ValueError, match="at most 4"):
        float_runner.forward(torch.zeros(1, PREFILL_CHUNK + 1, dtype=torch.int64), 0)


def test_program_plans_for_prefill_chunk(float_export, tmp_path, tiny4):
    """The memory plan follows the call length: a program taking whole MAX_SEQ_LEN calls plans more activations."""
    whole = _export(tiny4[0], dataclasses.replace(FLOAT, prefill_chunk=MAX_SEQ_LEN), tmp_path)
    chunked_plan = sum(planned_buffer_sizes(float_export.pte_path)["forward"])
    whole_plan = sum(planned_buffer_sizes(whole.pte_path)["forward"])
    print(f"planned bytes: calls of {PREFILL_CHUNK} tokens {chunked_plan}, of {MAX_SEQ_LEN} tokens {whole_plan}")
    assert chunked_plan < whole_plan


# Quantized programs of the bundled model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled_e2b():
    return bundled_source("e2b")


@pytest.fixture(scope="module")
def heldout_windows() -> list[list[int]]:
    return bundled_heldout_windows(HELDOUT_WINDOWS, BUNDLED_SEQ_LEN)


@pytest.fixture(scope="module", params=list(BUNDLED_SPECS))
def quantized_export(request, bundled_e2b, tmp_path_factory):
    spec = BUNDLED_SPECS[request.param]
    config = bundled_e2b[0].text_config
    result = export_executorch(
        bundled_e2b[0], tmp_path_factory.mktemp(f"et_{request.param}"), spec, BUNDLED_SEQ_LEN,
        bos_id=config.bos_token_id, eos_ids=list(config.eos_token_ids),
    )
    _print_export(spec, result)
    return request.param, spec, result


@pytest.mark.slow
def test_quantized_heldout_fidelity(bundled_e2b, heldout_windows, quantized_export):
    precision, _spec, result = quantized_export
    runner = ExecuTorchRunner(result.pte_path, result.ptd_path)
    windows = [torch.tensor([window]) for window in heldout_windows]
    reference = torch.cat([reference_logits(bundled_e2b[1], window) for window in windows], dim=1)
    # Token by token, because the program returns the last position's logits of each call.
    actual = torch.cat([runner.logits(window, chunk_sizes=[1] * window.shape[1]) for window in windows], dim=1)
    metrics = compare_logits(reference, actual)
    min_top1, max_kl = BUNDLED_BARS[precision]
    print(f"{precision} bundled e2b: top-1 {metrics.top1:.4f}, mean KL {metrics.mean_kl:.5f}, "
          f"max |Δ| {metrics.max_abs_logit:.3f} over {metrics.positions} positions")
    assert metrics.top1 >= min_top1, f"{precision}: top-1 {metrics.top1:.4f} < {min_top1}"
    assert metrics.mean_kl <= max_kl, f"{precision}: mean KL {metrics.mean_kl:.4f} > {max_kl}"


@pytest.mark.slow
def test_quantized_scheme_recorded(quantized_export):
    _precision, spec, result = quantized_export
    assert result.schemes["ple_table"].startswith(spec.ple)
    assert result.schemes["embed_tokens"].startswith(spec.embedding)
    assert result.schemes["linears"].startswith(spec.linear)


@pytest.mark.slow
def test_quantized_ple_table_lives_in_ptd(bundled_e2b, quantized_export):
    _precision, spec, result = quantized_export
    source = bundled_e2b[0]
    table = quantize_table(
        source.text_tensor("embed_tokens_per_layer.weight"), TABLE_BITS[spec.ple],
        source.text_config.hidden_size_per_layer_input,
    )
    values, scales = table.qvals.numpy().tobytes(), table.scales.numpy().tobytes()
    ptd, pte = result.ptd_path.read_bytes(), result.pte_path.read_bytes()

    assert result.ple_bytes == len(values) + len(scales)
    assert values in ptd
    assert scales in ptd
    # Headers and alignment only: a few KiB at most beside the table.
    assert result.ple_bytes <= len(ptd) <= result.ple_bytes + 4096
    # Any 256-byte window of the table would do; the first rows are the least likely to repeat elsewhere.
    assert values[:256] not in pte
    assert scales[:256] not in pte


# Quantized PLE table lookups ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_ple_lookup_rows(tiny4, precision):
    config = tiny4[0].text_config
    p = config.hidden_size_per_layer_input
    reference = tiny4[0].text_tensor("embed_tokens_per_layer.weight").float()
    table = quantize_table(reference, TABLE_BITS[precision], p)
    module = QuantizedPerLayerEmbedding(table, config.num_hidden_layers, p)

    last = config.vocab_size_per_layer_input - 1
    ids = torch.tensor([[0, last, last + 1, config.vocab_size - 1]])
    rows = module(ids).reshape(4, -1)
    expected_rows = reference[torch.tensor([0, last, 0, 0])] * p**0.5
    bound = (table.scales[torch.tensor([0, last, 0, 0])] / 2).repeat_interleave(p, dim=1) * p**0.5
    error = (rows - expected_rows).abs()
    assert (error <= bound + 1e-6).all(), f"max excess {float((error - bound).max()):.3e}"
    assert torch.equal(rows[2], rows[0]), "ids past the PLE table must read row 0"


# ExecuTorch's own LLM runner ----------------------------------------------------------------------------------------

# Runs in a fresh interpreter with nothing from this project: the runner streams the decoded pieces to stdout
# itself, so no Python token callback (which fails on partial UTF-8 byte pieces) is needed.
_RUNNER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import executorch.kernels.quantized  # the quantized embedding kernels, as a C++ runner links them
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pte, tokenizer, ptd, prompt, steps = sys.argv[1:6]
    runner = TextLLMRunner(pte, tokenizer, ptd)
    stats = []
    config = GenerationConfig(echo=False, max_new_tokens=int(steps), temperature=0.0, num_bos=1)
    runner.generate(prompt, config, stats_callback=lambda s: stats.append(
        (s.num_prompt_tokens, s.num_generated_tokens)))
    sys.stdout.flush()
    sys.stderr.write("STATS " + json.dumps(stats[-1]) + "\\n")
    """
)


def _check_text_llm_runner(tokenizer_path: Path, result) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
    prompt, steps = "The for statement", 12

    completed = subprocess.run(
        [sys.executable, "-c", _RUNNER_SCRIPT, str(result.pte_path), str(tokenizer_path), str(result.ptd_path),
         prompt, str(steps)],
        capture_output=True, timeout=300,
    )
    stderr = completed.stderr.decode(errors="replace")
    assert completed.returncode == 0, stderr[-2000:]
    stats_line = [line for line in stderr.splitlines() if line.startswith("STATS ")][-1]
    num_prompt, num_generated = json.loads(stats_line[len("STATS "):])

    prompt_ids = tokenizer(prompt)["input_ids"]
    assert num_prompt == len(prompt_ids), f"runner encoded {num_prompt} prompt tokens, expected {prompt_ids}"
    ours = ExecuTorchRunner(result.pte_path, result.ptd_path).generate(prompt_ids, steps)
    print(f"runner wrote {completed.stdout!r} ({num_generated} tokens); our greedy ids {ours}")
    # The runner prints the token sampled from the prefill and then `generated_tokens` decode steps, followed by its
    # own stats line.
    assert num_generated >= min(len(ours), steps) - 1
    ours = ours[: num_generated + 1]
    expected = tokenizer.decode([t for t in ours if t != 1]).encode()
    completed.stdout = completed.stdout.split(b"\nPyTorchObserver")[0]
    assert completed.stdout.rstrip(b"\n") == expected.rstrip(b"\n")


def test_text_llm_runner_float(tiny4, float_export):
    _check_text_llm_runner(tiny4[0].path / "tokenizer.json", float_export)


def test_ple_table_lives_in_ptd(tiny4, float_export):
    config = tiny4[0].text_config
    table_bytes = config.vocab_size_per_layer_input * config.ple_width * 4  # float32 program
    assert float_export.ple_bytes == table_bytes
    # The data file contains the table plus a small header. The program contains everything else but not the table.
    assert table_bytes <= float_export.ptd_bytes < table_bytes + 4096
    table = tiny4[0].text_tensor("embed_tokens_per_layer.weight").float().numpy().tobytes()
    assert table[:4096] not in float_export.pte_path.read_bytes()
    assert table[:4096] in float_export.ptd_path.read_bytes()


@pytest.mark.slow
def test_text_llm_runner_quantized(quantized_export):
    _check_text_llm_runner(BUNDLED_MODEL / "tokenizer.json", quantized_export[2])
