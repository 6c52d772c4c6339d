"""Loading checkpoint tensors (Hugging Face text names) into `Gemma3nDecoder`.

`hf_name_map` is the one table between module parameter names and checkpoint names. Below the two embeddings the
names only gain the `stack.` prefix. The LM head is not in the table because it is tied to the token embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from g3n_export.config import TextConfig
from g3n_export.errors import CheckpointError
from g3n_export.layout import text_shapes

_GLOBAL_NAMES = {
    "embedder.token_embedding.weight": "embed_tokens.weight",
    "embedder.per_layer_embedding.weight": "embed_tokens_per_layer.weight",
}
_COEFFICIENT_SUFFIXES = ("altup.prediction_coefs.weight", "altup.correction_coefs.weight")


def hf_name_map(config: TextConfig) -> dict[str, str]:
    """Return module parameter name -> checkpoint text name for every parameter the decoder has.

    KV-shared layers have no k_proj/v_proj/k_norm, so their checkpoint tensors appear nowhere in the map.
    """
    mapping: dict[str, str] = {}
    hf_to_module = {hf: module for module, hf in _GLOBAL_NAMES.items()}
    for hf_name in text_shapes(config, include_unused_kv=False):
        mapping[hf_to_module.get(hf_name, f"stack.{hf_name}")] = hf_name
    return mapping


def load_hf_weights(
    cls: type,
    config: TextConfig,
    get_tensor: Callable[[str], torch.Tensor],
    *,
    max_seq_len: int,
    dtype: torch.dtype,
    max_batch_size: int,
    source: str,
) -> nn.Module:
    """Build `cls(config, ...)` on the meta device, then assign every parameter from `get_tensor(hf_name)`.

    The AltUp coefficients are clipped to `altup_coef_clip`. Every parameter must be filled: a parameter the table
    misses, or a tensor with the wrong shape, raises instead of leaving random or empty weights behind.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape, or a parameter has no checkpoint tensor.
    """
    with torch.device("meta"):
        model = cls(config, max_seq_len, max_batch_size=max_batch_size, dtype=dtype)
    mapping = hf_name_map(config)
    expected = text_shapes(config, include_unused_kv=False)

    for module_name, hf_name in mapping.items():
        tensor = get_tensor(hf_name)
        if tuple(tensor.shape) != expected[hf_name]:
            raise CheckpointError(
                f"{source}: tensor {hf_name!r} has shape {list(tensor.shape)}, expected {list(expected[hf_name])}"
            )
        tensor = tensor.to(dtype)
        clip = config.altup_coef_clip
        if clip is not None and hf_name.endswith(_COEFFICIENT_SUFFIXES):
            tensor = tensor.clamp(-clip, clip)
        _assign(model, module_name, tensor)

    # The LM head shares the token embedding's parameter. Assignment replaced that parameter, so tie again.
    model.stack.lm_head.weight = model.embedder.token_embedding.weight
    model.reset_buffers()

    unfilled = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if unfilled:
        raise CheckpointError(f"{source}: no checkpoint tensor was loaded into {unfilled[:5]}, so the name table in weights.py is incomplete")
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    if not isinstance(getattr(module, attr, None), nn.Parameter):
        raise CheckpointError(f"the decoder has no parameter {name!r}, so the name table in weights.py and the model disagree")
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
