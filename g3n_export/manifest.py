"""`manifest.json` of an export folder: provenance, runtime facts, files with sha256, parity summary.

The manifest is what `validate`, `generate`, `bench` and the Android app read to find and trust an export, so a
folder without one, or whose files no longer match their recorded sha256, is rejected before any runtime loads it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from g3n_export.config import TextConfig
from g3n_export.errors import G3nError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TOOLS = ("g3n-export", "torch", "executorch", "torchao", "transformers", "onnx", "onnxruntime", "onnxscript")


class ExportFolderError(G3nError):
    """A folder that is not an export, or whose files changed since export."""


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, exclude: tuple[str, ...] = (MANIFEST, "parity.json", "parity.md")) -> dict[str, Any]:
    """Size and sha256 of every file under `folder`, keyed by POSIX path relative to it."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for tool in _TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = "not installed"
    return versions


def model_facts(config: TextConfig, max_seq_len: int) -> dict[str, Any]:
    """Return the runtime facts a consumer needs without reading the model config (see docs/artifacts.md)."""
    return {
        "vocab_size": config.vocab_size,
        "vocab_size_per_layer_input": config.vocab_size_per_layer_input,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size_per_layer_input": config.hidden_size_per_layer_input,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "kv_layers": list(config.kv_layers),
        "bos_token_id": config.bos_token_id,
        "eos_token_ids": list(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
        "max_seq_len": max_seq_len,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read an export folder's manifest and, with `verify`, check every recorded file's size and sha256.

    Raises:
        ExportFolderError: the folder is missing, is not an export, or a file is missing or changed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFolderError(
            f"export folder {folder} not found; pass the folder written by `g3n-export --target ...` (its --out)"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportFolderError(
            f"{folder} is not a g3n-export folder (no {MANIFEST}); pass the folder written by `g3n-export --target ...`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportFolderError(f"{path} is not valid JSON ({e}); re-run the export") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportFolderError(
            f"{path} has format_version {manifest.get('format_version')!r}; this g3n-export reads version "
            f"{FORMAT_VERSION}; re-run the export with this version"
        )
    if verify:
        for rel, entry in manifest.get("files", {}).items():
            file = folder / rel
            if not file.is_file():
                raise ExportFolderError(f"{file} is listed in {MANIFEST} but missing; re-run the export")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise ExportFolderError(
                    f"{file} changed since export (sha256 mismatch with {MANIFEST}); re-run the export to trust it again"
                )
    return manifest
