"""The main job: load → slice → build decoder → quantize → emit → validate, into one export folder written atomically."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from g3n_export.checkpoint import atomic_output_dir, check_free_space, open_checkpoint
from g3n_export.errors import G3nError
from g3n_export.manifest import FORMAT_VERSION, describe_files, model_facts, tool_versions, write_manifest
from g3n_export.matformer import SlicedCheckpoint, effective_parameters
from g3n_export.memory import peak_rss_bytes
from g3n_export.recipes import load_size_recipe
from g3n_export.targets.recipe import TargetRecipe, load_target_recipe

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


class StageError(G3nError):
    """A pipeline stage failed; the message names the stage."""


@dataclass(frozen=True)
class ExportRequest:
    model: str
    size: str
    target: str
    quant: str | None = None
    out: Path | None = None
    max_seq_len: int | None = None
    formats: str | None = None
    skip_validation: bool = False
    force: bool = False
    quiet: bool = False


@dataclass
class StageTiming:
    name: str
    seconds: float
    peak_rss: int


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    stages: list[StageTiming]
    passed: bool | None  # None when validation was skipped
    report_failures: list[str] = dataclasses.field(default_factory=list)


def default_out(model: str, size: str, target: str) -> Path:
    """`exports/<model>-<size>-<target>`, each part reduced to a file-name-safe stem."""
    def stem(value: str) -> str:
        name = Path(value.rstrip("/")).name
        name = name[:-5] if name.endswith(".toml") else name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"

    return Path("exports") / f"{stem(model)}-{stem(size)}-{stem(target)}"


@contextmanager
def stage(name: str, timings: list[StageTiming]):
    """Time one stage, log it, and turn an unexpected exception into a StageError that names the stage."""
    log.info("stage %s: started", name)
    started = time.perf_counter()
    try:
        yield
    except G3nError as e:
        raise type(e)(f"stage '{name}' failed: {e}") from None
    except Exception as e:
        raise StageError(f"stage '{name}' failed: {type(e).__name__}: {e} (set G3N_DEBUG=1 for the traceback)") from e
    seconds = time.perf_counter() - started
    timings.append(StageTiming(name, seconds, peak_rss_bytes()))
    log.info("stage %s: done in %.1f s (peak RSS %.2f GiB)", name, seconds, peak_rss_bytes() / 1024**3)


def _copy_tokenizer(model_dir: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise G3nError(
            f"{model_dir} has no tokenizer.json, which the runtimes need; add the model's tokenizer files to the folder"
        )
    return copied


def _estimated_bytes(source, recipe: TargetRecipe) -> int:
    """Rough size of the artifacts (weights at their quantized widths, once per format) for the disk-space check."""
    c = source.text_config
    params = effective_parameters(c) + c.vocab_size * c.hidden_size
    ple = c.vocab_size_per_layer_input * c.ple_width
    total = 0
    for fmt, spec in (("pte", recipe.executorch), ("onnx", recipe.onnx), ("ort", recipe.onnx)):
        if fmt in recipe.formats:
            bits = {"fp32": 32, "int8": 8, "int4": 4}[spec.precision]
            total += (params + ple) * bits // 8
    return total


def run_export(request: ExportRequest, *, progress=None) -> ExportResult:
    """Run the whole pipeline. Returns the result; the caller decides the exit code from `result.passed`.

    Raises:
        G3nError: bad input, or a stage failed (named in the message). No output folder is left behind.
    """
    timings: list[StageTiming] = []
    out = Path(request.out) if request.out else default_out(request.model, request.size, request.target)
    if out.exists() and not request.force:
        raise G3nError(f"{out} already exists; choose another --out or pass --force to replace it")
    # Recipes and options are checked before any stage starts, so a bad argument is reported as such.
    size = load_size_recipe(request.size)
    target = load_target_recipe(request.target).with_quant(request.quant).with_formats(request.formats)
    max_seq_len = request.max_seq_len or target.max_seq_len
    if max_seq_len < 8:
        raise G3nError(f"invalid --max-seq-len {max_seq_len}; use at least 8 tokens")
    with stage("load", timings):
        checkpoint = open_checkpoint(request.model)
        plan = size.plan(checkpoint.text_config)
        source = checkpoint if plan.is_identity else SlicedCheckpoint(checkpoint, plan)
    config = source.text_config
    specs = []
    if "pte" in target.formats:
        specs.append(f"ExecuTorch: {target.executorch.describe()}")
    if "onnx" in target.formats:
        specs.append(f"ONNX: {target.onnx.describe()}")
    log.info(
        "model %s, size %s (%d layers, %s effective parameters), target %s: formats %s, max_seq_len %d; %s",
        checkpoint.path, size.name, config.num_hidden_layers, f"{effective_parameters(config):,}", target.name,
        ",".join(target.formats), max_seq_len, "; ".join(specs),
    )

    with atomic_output_dir(out, force=request.force) as tmp:
        check_free_space(tmp, _estimated_bytes(source, target))
        artifacts: dict[str, dict] = {}
        if "pte" in target.formats:
            with stage("executorch", timings):
                from g3n_export.targets.executorch import export_executorch

                et_dir = tmp / "executorch"
                et_dir.mkdir()
                _copy_tokenizer(checkpoint.path, et_dir)
                result = export_executorch(source, et_dir, target.executorch, max_seq_len,
                                           bos_id=config.bos_token_id, eos_ids=list(config.eos_token_ids))
                artifacts["executorch"] = _as_dict(result, tmp) | {"precision": target.executorch.precision}
        if "onnx" in target.formats:
            with stage("onnx", timings):
                from g3n_export.targets.onnx import export_onnx

                onnx_dir = tmp / "onnx"
                onnx_dir.mkdir()
                _copy_tokenizer(checkpoint.path, onnx_dir)
                result = export_onnx(source, onnx_dir, target.onnx, max_seq_len=max_seq_len, ort="ort" in target.formats)
                artifacts["onnx"] = _as_dict(result, tmp) | {"precision": target.onnx.precision}

        manifest = {
            "format_version": FORMAT_VERSION,
            "source": {"model": str(request.model), "path": str(checkpoint.path.resolve()),
                       "config_sha256": _sha256_text((checkpoint.path / "config.json").read_text())},
            "size_recipe": {"name": size.name, "path": str(size.path) if getattr(size, "path", None) else None,
                            "layers_to_skip": list(plan.skipped), "ffn_widths": list(plan.ffn_widths)},
            "target_recipe": {"name": target.name, "formats": list(target.formats),
                              "executorch": dataclasses.asdict(target.executorch),
                              "onnx": dataclasses.asdict(target.onnx),
                              "bars": {k: dataclasses.asdict(v) for k, v in target.bars.items()}},
            "model": model_facts(config, max_seq_len),
            "artifacts": artifacts,
            "tools": tool_versions(),
        }
        manifest["files"] = describe_files(tmp)
        write_manifest(tmp, manifest)

        passed = None
        failures: list[str] = []
        if not request.skip_validation:
            with stage("validate", timings):
                from g3n_export.validate_folder import validate_export

                report = validate_export(tmp, source=source, manifest=manifest)
                report.write(tmp)
                manifest["parity"] = report.summary()
                write_manifest(tmp, manifest)
                passed = report.passed
                failures = report.failures()
        manifest["stages"] = [dataclasses.asdict(t) for t in timings]
        write_manifest(tmp, manifest)
    return ExportResult(out=out, manifest=manifest, stages=timings, passed=passed, report_failures=failures)


def _as_dict(result, folder: Path) -> dict:
    # Paths are stored relative to the export folder: the files are written in a temporary folder that is renamed at
    # the end, so absolute paths would name a folder that no longer exists.
    def relative(value):
        if isinstance(value, Path) and value.is_relative_to(folder):
            return value.relative_to(folder)
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        return value

    return json_safe(relative(dataclasses.asdict(result)))


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
