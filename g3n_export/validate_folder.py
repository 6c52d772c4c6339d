"""Validation of a whole export folder: find its artifacts and reference, run them, write the parity report."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from g3n_export.checkpoint import open_checkpoint
from g3n_export.errors import G3nError
from g3n_export.manifest import ExportFolderError, read_manifest
from g3n_export.matformer import SlicedCheckpoint, make_plan
from g3n_export.targets.recipe import ParityBars
from g3n_export.validate import (
    ArtifactRunner, ParityReport, load_reference_model, run_parity, validation_prompts, validation_token_stream,
)

log = logging.getLogger(__name__)

EXECUTORCH = "executorch-xnnpack"
ONNXRUNTIME = "onnxruntime-cpu"
ORT_FORMAT = "onnxruntime-ort-format"


class ExecuTorchAdapter:
    def __init__(self, folder: Path) -> None:
        from g3n_export.runtime.executorch import ExecuTorchRunner

        self.runner = ExecuTorchRunner(folder / "executorch" / "model.pte", folder / "executorch" / "ple.ptd")

    def prefill_logits(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self.runner.prefill_logits(tokens, positions)[0].float()

    def stepwise_logits(self, tokens: list[int]) -> torch.Tensor:
        return self.runner.logits(tokens, chunk_sizes=[1] * len(tokens))[0].float()

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        return self.runner.generate(prompt, steps, stop_at_eos=False)


class OnnxAdapter:
    def __init__(self, folder: Path, *, prefer_ort: bool) -> None:
        from g3n_export.runtime.onnx import OnnxGenerator

        self.generator = OnnxGenerator(folder / "onnx", prefer_ort=prefer_ort)

    def prefill_logits(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        logits, _ = self.generator.logits(tokens)
        return torch.from_numpy(np.asarray(logits[0, positions], dtype=np.float32))

    def stepwise_logits(self, tokens: list[int]) -> torch.Tensor:
        rows, past = [], None
        for token in tokens:
            logits, past = self.generator.logits([token], past)
            rows.append(torch.from_numpy(np.asarray(logits[0, -1], dtype=np.float32)))
        return torch.stack(rows)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        return self.generator.generate(prompt, steps, eos_ids=())


def artifact_runners(folder: Path, manifest: dict) -> tuple[dict, dict[str, str]]:
    """Runner factories per (artifact, runtime) present in the folder, and each artifact's precision class."""
    runners: dict = {}
    precision: dict[str, str] = {}
    artifacts = manifest.get("artifacts", {})
    if "executorch" in artifacts:
        precision["executorch"] = artifacts["executorch"]["precision"]
        runners[("executorch", EXECUTORCH)] = lambda: ExecuTorchAdapter(folder)
    if "onnx" in artifacts:
        precision["onnx"] = artifacts["onnx"]["precision"]
        runners[("onnx", ONNXRUNTIME)] = lambda: OnnxAdapter(folder, prefer_ort=False)
        if any((folder / "onnx").glob("*.ort")):
            precision["ort"] = artifacts["onnx"]["precision"]
            runners[("ort", ORT_FORMAT)] = lambda: OnnxAdapter(folder, prefer_ort=True)
    return runners, precision


def source_from_manifest(manifest: dict):
    """Reopen the source checkpoint the manifest names and re-apply its MatFormer slice.

    Raises:
        ExportFolderError: the source is gone or its config changed since export.
    """
    src = manifest["source"]
    path = Path(src["path"])
    if not path.is_dir():
        raise ExportFolderError(
            f"the source model of this export, {path}, is not found; validation needs it as the float reference"
        )
    config_sha = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    if config_sha != src["config_sha256"]:
        raise ExportFolderError(f"the source model {path} changed since export (config.json sha256 differs)")
    checkpoint = open_checkpoint(path)
    size = manifest["size_recipe"]
    plan = make_plan(checkpoint.text_config, size["layers_to_skip"], size["ffn_widths"])
    return checkpoint if plan.is_identity else SlicedCheckpoint(checkpoint, plan)


def validate_export(folder: Path, *, source=None, manifest: dict | None = None, on_case=None) -> ParityReport:
    """Run every artifact of an export folder against the float reference and return the report.

    Args:
        folder: the export folder.
        source: the (sliced) checkpoint the export came from; read from the manifest when None.
        manifest: the folder's manifest; read and verified (sha256) when None.
        on_case: called with each `CaseResult` as it completes (progress display).
    """
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    if source is None:
        source = source_from_manifest(manifest)
    runners, precision = artifact_runners(folder, manifest)
    if not runners:
        raise G3nError(f"{folder} contains no ExecuTorch or ONNX artifacts; its manifest lists none to validate")

    model = manifest["model"]
    tokenizer = folder / ("executorch" if (folder / "executorch").is_dir() else "onnx") / "tokenizer.json"
    model_dir = Path(manifest["source"]["path"])
    stream = validation_token_stream(model_dir, tokenizer, model["vocab_size"])
    call_len = manifest.get("artifacts", {}).get("executorch", {}).get("prefill_chunk")
    prompts = validation_prompts(stream, model["bos_token_id"], model["sliding_window"], model["max_seq_len"], call_len)
    bars = {k: ParityBars(**v) for k, v in manifest["target_recipe"]["bars"].items()}

    log.info("loading the float32 reference (transformers)")
    reference = load_reference_model(source)
    torch.manual_seed(0)
    return run_parity(reference, runners, prompts, precision, bars, on_case=on_case)
