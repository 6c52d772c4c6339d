"""Random-weight Gemma 3n checkpoints in Google's exact Hugging Face layout.

No real weights can be downloaded where this project is built and tested, so tests and benchmarks run on
checkpoints made here: the `tiny` preset keeps E4B's 35-layer structure with tiny widths, the `e2b` and `e4b` presets
have the real dimensions (random weights give real sizes, memory use and speed, but meaningless outputs).
Every preset carries the vision and audio tower tensors, so loaders prove that they skip or carry them.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from g3n_export.bundled import BUNDLED_MODEL
from g3n_export.checkpoint import TensorSpec, write_checkpoint
from g3n_export.config import TextConfig
from g3n_export.errors import CheckpointError, G3nError
from g3n_export.layout import TEXT_PREFIX, text_shapes, tower_shapes

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Chunks of at most this many elements bound peak memory when generating the PLE table (2.35e9 values in E4B).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True)
class Preset:
    """Text decoder dimensions of a synthetic checkpoint; layer structure is always Gemma 3n's."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size_per_layer_input: int
    laurel_rank: int
    num_kv_shared_layers: int
    sliding_window: int
    vocab_size_per_layer_input: int | None  # None: the tokenizer's vocabulary size
    extra_vocab: int  # rows of embed_tokens past the PLE vocabulary (multimodal placeholders)
    tower_dim_cap: int | None  # shrink tower tensor dims to this size (tiny preset), None for real dims


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", hidden_size=32, num_hidden_layers=35, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, hidden_size_per_layer_input=8, laurel_rank=4,
                   num_kv_shared_layers=15, sliding_window=16, vocab_size_per_layer_input=None, extra_vocab=64,
                   tower_dim_cap=4),
    "e2b": Preset("e2b", hidden_size=2048, num_hidden_layers=30, intermediate_size=8192, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=256, hidden_size_per_layer_input=256, laurel_rank=64,
                  num_kv_shared_layers=10, sliding_window=512, vocab_size_per_layer_input=262_144, extra_vocab=256,
                  tower_dim_cap=None),
    "e4b": Preset("e4b", hidden_size=2048, num_hidden_layers=35, intermediate_size=16_384, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=256, hidden_size_per_layer_input=256, laurel_rank=64,
                  num_kv_shared_layers=15, sliding_window=512, vocab_size_per_layer_input=262_144, extra_vocab=256,
                  tower_dim_cap=None),
}


def tokenizer_source() -> Path:
    """Folder whose tokenizer files synthetic checkpoints copy (the bundled model's)."""
    missing = [f for f in TOKENIZER_FILES if not (BUNDLED_MODEL / f).is_file()]
    if missing:
        raise CheckpointError(
            f"the bundled tokenizer is missing {', '.join(missing)} in {BUNDLED_MODEL}; reinstall g3n-export"
        )
    return BUNDLED_MODEL


def tokenizer_vocab_size(folder: Path) -> int:
    """Number of ids the tokenizer in `folder` can produce (from tokenizer.json)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values()) if isinstance(data["model"]["vocab"], dict) else range(len(data["model"]["vocab"]))
    ids = list(ids) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def synthetic_config(preset: Preset, vocab_per_layer: int, *, text_only: bool) -> dict:
    """Return the `config.json` dict of a synthetic checkpoint, built with transformers' own config classes."""
    from transformers import Gemma3nConfig, Gemma3nTextConfig

    n = preset.num_hidden_layers
    text = Gemma3nTextConfig(
        vocab_size=vocab_per_layer + preset.extra_vocab,
        vocab_size_per_layer_input=vocab_per_layer,
        hidden_size=preset.hidden_size,
        hidden_size_per_layer_input=preset.hidden_size_per_layer_input,
        intermediate_size=[preset.intermediate_size] * n,
        num_hidden_layers=n,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        head_dim=preset.head_dim,
        laurel_rank=preset.laurel_rank,
        num_kv_shared_layers=preset.num_kv_shared_layers,
        sliding_window=preset.sliding_window,
    )
    if text_only:
        config = text.to_dict()
        config["architectures"] = ["Gemma3nForCausalLM"]
    else:
        config = Gemma3nConfig(text_config=text).to_dict()
        config["architectures"] = ["Gemma3nForConditionalGeneration"]
    config["dtype"] = "bfloat16"
    config.pop("_name_or_path", None)
    return config


def _tensor_specs(text: TextConfig, preset: Preset, *, text_only: bool) -> list[TensorSpec]:
    specs = [TensorSpec(TEXT_PREFIX + name, torch.bfloat16, shape) for name, shape in text_shapes(text).items()]
    if not text_only:
        for name, shape in tower_shapes().items():
            if preset.tower_dim_cap is not None:
                shape = tuple(min(s, preset.tower_dim_cap) for s in shape)
            specs.append(TensorSpec(name, torch.bfloat16, shape))
    return specs


def _random_tensor(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """Yield a deterministic random tensor in row chunks; the values depend only on the name and the seed."""
    gen = torch.Generator().manual_seed((zlib.crc32(spec.name.encode()) << 16) ^ seed)
    shape = spec.shape
    if len(shape) == 1 or spec.name.endswith("correct_output_scale"):
        # Norm weights and scales stay near 1 so activations keep a sensible magnitude.
        yield (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(spec.dtype)
        return
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    std = 0.1 if ".altup." in spec.name else fan_in**-0.5
    row_elements = max(1, fan_in)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row_elements)
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        yield (torch.randn((rows, *shape[1:]), generator=gen) * std).to(spec.dtype)


def make_synthetic(
    preset_name: str,
    out: Path,
    *,
    seed: int = 0,
    text_only: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a random-weight Gemma 3n checkpoint in the Hugging Face layout (bf16, sharded, with tokenizer).

    Raises:
        G3nError: unknown preset, or `out` exists without `force`.
    """
    if preset_name not in PRESETS:
        raise G3nError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    tok_dir = tokenizer_source()
    vocab = preset.vocab_size_per_layer_input or tokenizer_vocab_size(tok_dir)
    config = synthetic_config(preset, vocab, text_only=text_only)
    text = TextConfig.from_hf_dict(config)
    specs = _tensor_specs(text, preset, text_only=text_only)

    started = time.perf_counter()
    write_checkpoint(
        Path(out), config, specs, lambda spec: _random_tensor(spec, seed),
        extra_files=[tok_dir / f for f in TOKENIZER_FILES], force=force, progress=progress,
        # The tiny preset uses 1 MiB shards so that tests exercise sharded loading like the real 4-shard files.
        max_shard_bytes=4 * 1024**3 if preset.tower_dim_cap is None else 1024**2,
    )
    log.info("wrote %s preset (%d tensors) to %s in %.1f s", preset_name, len(specs), out, time.perf_counter() - started)
    return Path(out)


def total_bytes(preset_name: str, *, text_only: bool = False) -> int:
    """Bytes of tensor data a preset writes (for progress bars and disk-space checks)."""
    preset = PRESETS[preset_name]
    vocab = preset.vocab_size_per_layer_input or tokenizer_vocab_size(tokenizer_source())
    text = TextConfig.from_hf_dict(synthetic_config(preset, vocab, text_only=text_only))
    return sum(s.nbytes for s in _tensor_specs(text, preset, text_only=text_only))
