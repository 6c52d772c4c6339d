"""Held-out perplexity of the bundled model and of its slices, and the unigram baseline it must beat.

Each held-out paragraph is encoded as `<bos> text` and cut into windows of at most `window` tokens, each led by
`<bos>`. The model predicts every token after the `<bos>`, so each token of the paragraph is scored exactly once.
Perplexity is exp(total negative log-likelihood / tokens scored).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from g3n_export.tokenizer import BOS_ID, PAD_ID

WINDOW = 128
BATCH = 16


def heldout_windows(sp, texts: Sequence[str], window: int = WINDOW) -> list[list[int]]:
    """Encode held-out texts with SentencePiece processor `sp` and cut them into `<bos>`-led windows."""
    windows = []
    for text in texts:
        ids = sp.encode(text)
        for start in range(0, len(ids), window - 1):
            windows.append([BOS_ID] + ids[start:start + window - 1])
    return windows


@torch.no_grad()
def perplexity(model, windows: Sequence[Sequence[int]], *, call=None, batch: int = BATCH) -> float:
    """Return the perplexity of `model` (a `Gemma3nForCausalLM`) on the windows, computed in float32.

    Windows are right-padded to a common length. Causal attention keeps real tokens from seeing the padding, and
    padded positions are not scored. `call` replaces `model(...)` (a `Submodel` bound to a full model).
    """
    was_training = model.training
    model.eval()
    forward = call or model
    # Batching windows of similar length keeps the padding small. The order only changes float rounding.
    windows = sorted(windows, key=len)
    nll = 0.0
    count = 0
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        width = max(len(w) for w in group)
        ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
        scored = torch.zeros((len(group), width - 1), dtype=torch.bool)
        for row, w in enumerate(group):
            ids[row, :len(w)] = torch.tensor(w)
            scored[row, :len(w) - 1] = True
        logits = forward(input_ids=ids, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll -= logp[scored].double().sum().item()
        count += int(scored.sum())
    model.train(was_training)
    return math.exp(nll / count)


def unigram_perplexity(train_ids: Sequence[int], windows: Sequence[Sequence[int]], vocab: int) -> float:
    """Perplexity of an add-one smoothed unigram model of the training tokens on the same scored tokens."""
    counts = Counter(train_ids)
    total = len(train_ids) + vocab
    nll = 0.0
    scored = 0
    for w in windows:
        for token in w[1:]:
            nll -= math.log((counts[token] + 1) / total)
            scored += 1
    return math.exp(nll / scored)
