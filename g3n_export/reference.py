"""Float reference for the Gemma 3n text decoder: transformers' `Gemma3nForCausalLM`, loaded from our checkpoints.

The reference is loaded with `from_pretrained` and a `Gemma3nTextConfig` built from the checkpoint's text config, for
multimodal (`gemma3n`) and text-only (`gemma3n_text`) folders alike. transformers 5 strips `language_model.` from
`model.language_model.*` for this class and reports the vision/audio tensors as unexpected keys, which are ignored.
Because a loading rule that silently skipped a tensor would leave it randomly initialized, every loaded text tensor is
compared with the file afterwards.
"""

from __future__ import annotations

import logging
import os

import torch

from g3n_export.checkpoint import Checkpoint, open_checkpoint
from g3n_export.config import text_config_dict
from g3n_export.errors import CheckpointError

log = logging.getLogger(__name__)

# Rows compared per embedding table: enough to catch a wrong or random table without reading gigabytes twice.
_TABLE_ROWS_CHECKED = 4096


def load_reference(source: str | os.PathLike | Checkpoint):
    """Load transformers' `Gemma3nForCausalLM` in float32 eval mode with the checkpoint's text weights.

    Attention runs with the "eager" implementation, the literal formula. The multimodal towers are not loaded.

    Args:
        source: a checkpoint folder, a Hub id, or an open `Checkpoint`.

    Raises:
        CheckpointError: a text tensor is missing from the checkpoint or was not loaded with the stored values.
    """
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    text = {k: v for k, v in text_config_dict(checkpoint.config_dict).items() if k != "model_type"}
    config = Gemma3nTextConfig(**text)

    model, info = Gemma3nForCausalLM.from_pretrained(
        str(checkpoint.path),
        config=config,
        dtype=torch.float32,
        attn_implementation="eager",
        output_loading_info=True,
    )
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
    if missing or info.get("mismatched_keys"):
        raise CheckpointError(
            f"{checkpoint.path}: transformers could not load the text decoder: missing {missing[:5]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:5]}"
        )
    model.eval()
    _check_loaded(model, checkpoint)
    return model


def _check_loaded(model, checkpoint: Checkpoint) -> None:
    params = dict(model.model.named_parameters())
    stored = set(checkpoint.text_names())
    for name, param in params.items():
        if name not in stored:
            raise CheckpointError(f"{checkpoint.path}: reference parameter {name!r} has no tensor in the checkpoint")
        expected = checkpoint.text_tensor(name)
        loaded = param.detach()
        if name in ("embed_tokens.weight", "embed_tokens_per_layer.weight"):
            expected, loaded = expected[:_TABLE_ROWS_CHECKED], loaded[:_TABLE_ROWS_CHECKED]
        if not torch.equal(loaded, expected.to(loaded.dtype)):
            raise CheckpointError(
                f"{checkpoint.path}: transformers loaded {name!r} with values that differ from the file"
            )
    if not torch.equal(model.lm_head.weight[:_TABLE_ROWS_CHECKED], params["embed_tokens.weight"][:_TABLE_ROWS_CHECKED]):
        raise CheckpointError(f"{checkpoint.path}: the reference LM head is not tied to the token embedding")


@torch.no_grad()
def reference_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Return float32 logits `[B, T, V]` of one full-sequence forward (no cache) of int64 `tokens` `[B, T]`."""
    return model(input_ids=tokens, use_cache=False).logits.float()
