"""Parity metrics between an artifact's logits and the float32 reference logits, and the validation prompts.

Every target (ExecuTorch, ONNX Runtime, ORT format) is judged with these functions, so their numbers compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LogitMetrics:
    """Agreement of artifact logits with reference logits over the same positions."""

    positions: int
    max_abs_logit: float  # max |Δlogit| over every position and vocabulary entry
    mean_kl: float  # mean over positions of KL(reference ‖ artifact), in nats
    top1: float  # fraction of positions whose argmax matches the reference's

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(reference: torch.Tensor, artifact: torch.Tensor) -> LogitMetrics:
    """Compare two logit tensors of the same shape `[..., V]` position by position (both cast to float64)."""
    if reference.shape != artifact.shape:
        raise ValueError(f"logit shapes differ: reference {list(reference.shape)}, artifact {list(artifact.shape)}")
    ref = reference.detach().reshape(-1, reference.shape[-1]).double()
    art = artifact.detach().reshape(-1, artifact.shape[-1]).double()
    ref_logp = torch.log_softmax(ref, dim=-1)
    art_logp = torch.log_softmax(art, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - art_logp)).sum(-1)
    return LogitMetrics(
        positions=ref.shape[0],
        max_abs_logit=float((ref - art).abs().max()),
        mean_kl=float(kl.mean()),
        top1=float((ref.argmax(-1) == art.argmax(-1)).double().mean()),
    )


def greedy_match(reference_tokens: list[int], artifact_tokens: list[int]) -> float:
    """Fraction of greedy tokens the artifact produced before its first disagreement with the reference."""
    if not reference_tokens:
        return 1.0
    same = 0
    for ref, art in zip(reference_tokens, artifact_tokens):
        if ref != art:
            break
        same += 1
    return same / len(reference_tokens)


@torch.no_grad()
def reference_greedy(reference_model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt` by the float reference, one full-sequence forward per step (no cache)."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        logits = reference_model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        tokens.append(nxt)
    return out
