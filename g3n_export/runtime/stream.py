"""Token streaming over either runtime: greedy decoding one token at a time, and UTF-8-safe incremental detokenizing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

RUNTIMES = ("executorch", "onnxruntime")


def greedy_stream(folder: Path, runtime: str, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> Iterator[int]:
    """Yield greedy tokens after `prompt` from the export folder's artifact for `runtime`, stopping after an EOS id."""
    if runtime == "executorch":
        from g3n_export.runtime.executorch import ExecuTorchRunner

        runner = ExecuTorchRunner(folder / "executorch" / "model.pte", folder / "executorch" / "ple.ptd")
        limit = runner.max_context_len
        logits = runner.prefill(prompt)[0, -1]
        position = len(prompt)
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            yield token
            if token in eos_ids or position >= limit:
                return
            logits = runner.forward(torch.tensor([[token]]), position)[0, -1]
            position += 1
    elif runtime == "onnxruntime":
        from g3n_export.runtime.onnx import OnnxGenerator

        generator = OnnxGenerator(folder / "onnx", prefer_ort=True)
        logits, past = generator.logits(prompt)
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            yield token
            if token in eos_ids:
                return
            logits, past = generator.logits([token], past)
    else:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


class TextStreamer:
    """Turn a growing list of token ids into text pieces without ever cutting a multi-byte UTF-8 character.

    Byte-fallback tokens can each carry one byte of a character, so the decoded text is emitted only up to the last
    complete character (a trailing U+FFFD means the bytes so far end mid-character).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
