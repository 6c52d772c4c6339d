"""Parity validation of exported artifacts against the float32 transformers reference.

Each artifact runs on a real runtime: ExecuTorch with XNNPACK, ONNX Runtime CPU, or ONNX Runtime on the ORT-format
files. The prompt set is fixed: a short prompt, prompts of exactly one window, one past it and several windows long.
One prompt is also fed token by token, and one is continued by greedy generation. Metrics come from `g3n_export.parity`; the target
recipe's bars for the artifact's precision decide pass or fail.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from g3n_export.errors import CheckpointError
from g3n_export.parity import compare_logits, greedy_match, reference_greedy
from g3n_export.targets.recipe import ParityBars

log = logging.getLogger(__name__)

VALIDATION_TEXT = Path(__file__).parent / "data" / "validation.txt"
HELDOUT_FILE = "heldout.json"  # {"paragraphs": [{"topic": ..., "text": ...}]}, shipped by the bundled model
GREEDY_STEPS = 16
# Prefill cases compare every position of prompts up to this length, and this many evenly spaced positions of longer
# ones. A program that returns only the last position's logits needs one prefill per compared position.
PREFILL_POSITIONS = 128
LONG_PROMPT_POSITIONS = 32


class ArtifactRunner(Protocol):
    """Runtime interface of validation: logits for a fresh sequence, fed at once or one token at a time."""

    def prefill_logits(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Float32 logits `[P, V]` at `positions` of a new sequence processed in one call."""

    def stepwise_logits(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits `[T, V]` of a new sequence fed one token per call through the KV cache."""

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """`steps` greedy tokens after `prompt` (no early stop at EOS)."""


@dataclass(frozen=True)
class Prompt:
    name: str
    tokens: list[int]


@dataclass
class CaseResult:
    """Metrics of one artifact on one prompt and mode (prefill, stepwise or greedy)."""

    artifact: str
    runtime: str
    prompt: str
    mode: str
    tokens: int
    max_abs_logit: float | None = None
    mean_kl: float | None = None
    top1: float | None = None
    greedy_match: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    cases: list[CaseResult]
    precision: dict[str, str]  # artifact -> precision class whose bars applied
    bars: dict[str, dict]  # precision class -> bars

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def failures(self) -> list[str]:
        return [f"{c.artifact} on {c.runtime}, prompt {c.prompt!r} ({c.mode}): {msg}" for c in self.cases for msg in c.failures]

    def summary(self) -> dict:
        per_artifact: dict[str, dict] = {}
        for c in self.cases:
            entry = per_artifact.setdefault(f"{c.artifact}/{c.runtime}", {
                "precision": self.precision.get(c.artifact), "passed": True, "max_abs_logit": 0.0,
                "max_mean_kl": 0.0, "min_top1": 1.0, "min_greedy_match": 1.0,
            })
            entry["passed"] &= c.passed
            if c.max_abs_logit is not None:
                entry["max_abs_logit"] = max(entry["max_abs_logit"], c.max_abs_logit)
                entry["max_mean_kl"] = max(entry["max_mean_kl"], c.mean_kl)
                entry["min_top1"] = min(entry["min_top1"], c.top1)
            if c.greedy_match is not None:
                entry["min_greedy_match"] = min(entry["min_greedy_match"], c.greedy_match)
        return {"passed": self.passed, "artifacts": per_artifact}

    def to_json(self) -> dict:
        return {"passed": self.passed, "precision": self.precision, "bars": self.bars,
                "cases": [asdict(c) | {"passed": c.passed} for c in self.cases]}

    def to_markdown(self) -> str:
        lines = ["# Parity report", "", f"Verdict: **{'PASS' if self.passed else 'FAIL'}**", "",
                 "Reference: transformers float32 on the same (sliced) checkpoint. KL is KL(reference ‖ artifact) "
                 "in nats, averaged over positions.", ""]
        lines += ["| artifact | runtime | prompt | mode | prompt tokens | max abs Δlogit | mean KL | top-1 | greedy match | result |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        for c in self.cases:
            lines.append(
                f"| {c.artifact} | {c.runtime} | {c.prompt} | {c.mode} | {c.tokens} | {fmt(c.max_abs_logit, '.3g')} | "
                f"{fmt(c.mean_kl, '.3g')} | {fmt(c.top1, '.3f')} | {fmt(c.greedy_match, '.3f')} | "
                f"{'pass' if c.passed else 'FAIL: ' + '; '.join(c.failures)} |"
            )
        lines += ["", "Bars by precision class (a metric without a bar is reported, not checked):", ""]
        for precision, bars in self.bars.items():
            lines.append(f"- {precision}: " + ", ".join(f"{k} {v}" for k, v in bars.items() if v is not None))
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> None:
        (folder / "parity.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        (folder / "parity.md").write_text(self.to_markdown())


# Reference ----------------------------------------------------------------------------------------------------------

def load_reference_model(source):
    """transformers' `Gemma3nForCausalLM` in float32 with the text weights of a checkpoint or a sliced view of one.

    A sliced view (`SlicedCheckpoint`) has no folder of its own, so its tensors are loaded from memory.
    """
    from g3n_export.checkpoint import Checkpoint
    from g3n_export.reference import load_reference

    if isinstance(source, Checkpoint):
        return load_reference(source)
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from g3n_export.matformer import _base_text_dict

    text = _base_text_dict(source.text_config)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**text)).float().eval()
    params = dict(model.model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            try:
                param.copy_(source.text_tensor(name).float())
            except KeyError:
                raise CheckpointError(f"the sliced checkpoint has no tensor {name!r} for the reference") from None
    model.tie_weights()
    return model


# Prompts ------------------------------------------------------------------------------------------------------------

def validation_token_stream(model_dir: Path | None, tokenizer_file: Path, vocab_limit: int) -> list[int]:
    """Token ids of the validation text: the model's held-out text when it ships one, else a packaged English text."""
    from tokenizers import Tokenizer

    heldout = model_dir / HELDOUT_FILE if model_dir is not None else None
    if heldout is not None and heldout.is_file():
        text = "\n\n".join(p["text"] for p in json.loads(heldout.read_text())["paragraphs"])
    else:
        text = VALIDATION_TEXT.read_text()
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    return [i for i in ids if i < vocab_limit]


def validation_prompts(
    stream: list[int], bos_id: int, sliding_window: int, max_seq_len: int, call_len: int | None = None
) -> list[Prompt]:
    """Prompts of 8 tokens, one window, one window + 1 and up to three windows, all fitting greedy steps in the cache.

    With `call_len` (the maximum tokens an ExecuTorch program takes per call), a prompt of `call_len + window + 1`
    tokens is added when no other prompt is longer than one call, so that some prefill runs in several calls.
    """
    room = max_seq_len - GREEDY_STEPS
    lengths = {"short": 8, "window": sliding_window, "window+1": sliding_window + 1,
               "long": min(3 * sliding_window, room)}
    if call_len is not None and max(lengths.values()) <= call_len < room:
        lengths["calls"] = call_len + sliding_window + 1
    prompts = []
    rng = random.Random(0)
    for name, length in lengths.items():
        length = min(length, room)
        if length < 2 or any(p.tokens.__len__() == length for p in prompts):
            continue
        start = rng.randrange(0, max(1, len(stream) - length))
        body = stream[start:start + length - 1]
        if len(body) < length - 1:
            body = (body * (length // max(1, len(body)) + 1))[: length - 1]
        prompts.append(Prompt(name, [bos_id, *body]))
    return prompts


def prefill_positions(length: int) -> list[int]:
    """Positions a prefill case compares: all of them, or `LONG_PROMPT_POSITIONS` spread over a long prompt."""
    if length <= PREFILL_POSITIONS:
        return list(range(length))
    count = LONG_PROMPT_POSITIONS
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


# Running ------------------------------------------------------------------------------------------------------------

def _judge(case: CaseResult, bars: ParityBars) -> None:
    checks = [
        ("max_abs_logit", case.max_abs_logit, bars.max_abs_logit, "max"),
        ("mean_kl", case.mean_kl, bars.max_mean_kl, "max"),
        ("top1", case.top1, bars.min_top1, "min"),
        ("greedy_match", case.greedy_match, bars.min_greedy_match, "min"),
    ]
    for metric, value, bar, kind in checks:
        if value is None or bar is None:
            continue
        if kind == "max" and value > bar:
            case.failures.append(f"{metric} {value:.4g} is above the bar {bar:g}")
        if kind == "min" and value < bar:
            case.failures.append(f"{metric} {value:.4g} is below the bar {bar:g}")


@torch.no_grad()
def run_parity(
    reference,
    runners: dict[tuple[str, str], Callable[[], ArtifactRunner]],
    prompts: list[Prompt],
    precision: dict[str, str],
    bars: dict[str, ParityBars],
    *,
    on_case: Callable[[CaseResult], None] | None = None,
) -> ParityReport:
    """Run every (artifact, runtime) pair over the prompts and judge each case against its precision's bars.

    Args:
        reference: the float32 transformers model.
        runners: (artifact, runtime) -> factory of a fresh `ArtifactRunner`.
        prompts: token prompts (with BOS).
        precision: artifact -> precision class (fp32, int8, int4) selecting its bars.
        bars: precision class -> bars.
    """
    ref_logits = {p.name: reference(input_ids=torch.tensor([p.tokens]), use_cache=False).logits[0].float() for p in prompts}
    greedy_prompt = prompts[0]
    ref_greedy = reference_greedy(reference, greedy_prompt.tokens, GREEDY_STEPS)
    stepwise_prompt = next((p for p in prompts if p.name == "window+1"), prompts[-1])

    cases: list[CaseResult] = []
    for (artifact, runtime), make_runner in runners.items():
        runner = make_runner()
        artifact_bars = bars.get(precision[artifact], ParityBars())

        def record(case: CaseResult) -> None:
            _judge(case, artifact_bars)
            cases.append(case)
            if on_case:
                on_case(case)

        for prompt in prompts:
            positions = prefill_positions(len(prompt.tokens))
            m = compare_logits(ref_logits[prompt.name][positions], runner.prefill_logits(prompt.tokens, positions))
            mode = "prefill"
            if len(positions) < len(prompt.tokens):
                mode = f"prefill at {len(positions)} of {len(prompt.tokens)} positions"
            record(CaseResult(artifact, runtime, prompt.name, mode, len(prompt.tokens),
                              m.max_abs_logit, m.mean_kl, m.top1))
        m = compare_logits(ref_logits[stepwise_prompt.name], runner.stepwise_logits(stepwise_prompt.tokens))
        record(CaseResult(artifact, runtime, stepwise_prompt.name, "token by token", len(stepwise_prompt.tokens),
                          m.max_abs_logit, m.mean_kl, m.top1))
        tokens = runner.greedy(greedy_prompt.tokens, GREEDY_STEPS)
        record(CaseResult(artifact, runtime, greedy_prompt.name, f"greedy {GREEDY_STEPS}", len(greedy_prompt.tokens),
                          greedy_match=greedy_match(ref_greedy, tokens)))
    return ParityReport(cases=cases, precision=precision,
                        bars={k: asdict(v) for k, v in bars.items() if k in set(precision.values())})
