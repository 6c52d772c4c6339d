"""Shared fixtures: tiny synthetic Gemma 3n checkpoints and their transformers reference models."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import (  # noqa: E402
    LOGITS_ATOL,
    SLICED_LOGITS_ATOL,
    multimodal_config,
    sliced_checkpoint,
    tiny_text_config,
    write_tiny_checkpoint,
)

from g3n_export.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from g3n_export.config import TextConfig  # noqa: E402


@dataclass
class TinyModel:
    """A tiny checkpoint on disk with its transformers reference model."""

    name: str
    checkpoint: Checkpoint
    reference: torch.nn.Module
    atol: float = LOGITS_ATOL  # float32 tolerance against the reference logits

    @property
    def config(self) -> TextConfig:
        return self.checkpoint.text_config


def _write_text7(path: Path) -> Path:
    # 7 layers (sliding x4, full, sliding x2), layers 5-6 read layer 3's K/V, window 4, sparsity on layers 0-1.
    return write_tiny_checkpoint(path, tiny_text_config(7, sliding_window=4, num_kv_shared_layers=2), seed=1)


def _write_multimodal10(path: Path) -> Path:
    # Multimodal wrapper with tower tensors. 10 layers, layers 6-9 shared (sliding read 5, full 9 reads 4), window 8.
    # Softer attention keeps 55 greedy positions well conditioned (see `sliced_checkpoint`).
    text = tiny_text_config(10, sliding_window=8, num_kv_shared_layers=4, sparsity=[0.95, 0.0, 0.95] + [0.0] * 7)
    return write_tiny_checkpoint(path, multimodal_config(text), seed=2, qk_norm_scale=0.5)


TINY_BUILDERS = {"text7": _write_text7, "multimodal10": _write_multimodal10, "sliced30": sliced_checkpoint}
_built: dict[str, TinyModel] = {}


@pytest.fixture(scope="session", params=list(TINY_BUILDERS))
def tiny(request, tmp_path_factory) -> TinyModel:
    """Each tiny checkpoint in turn, built once per session."""
    return tiny_model(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def text7(tmp_path_factory) -> TinyModel:
    return tiny_model("text7", tmp_path_factory)


def tiny_model(name: str, tmp_path_factory) -> TinyModel:
    from g3n_export.reference import load_reference

    if name not in _built:
        path = TINY_BUILDERS[name](tmp_path_factory.mktemp(name) / "checkpoint")
        checkpoint = open_checkpoint(path)
        atol = SLICED_LOGITS_ATOL if name == "sliced30" else LOGITS_ATOL
        _built[name] = TinyModel(name, checkpoint, load_reference(checkpoint), atol)
    return _built[name]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
