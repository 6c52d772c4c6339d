"""Streaming MatFormer slicer: write a Mix-n-Match submodel of a checkpoint as a new Hugging Face checkpoint.

Tensors are read, cut and written one at a time, and large ones in blocks of rows. Peak memory is therefore a few
blocks (`chunk_bytes`, 64 MiB by default: the block read, its cut copy and the write buffer), whatever the model
size. The rules for what to cut live in `g3n_export.matformer`; this module moves bytes and writes the side files.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

from g3n_export.checkpoint import Checkpoint, TensorInfo, TensorSpec, write_checkpoint
from g3n_export.config import text_config_dict
from g3n_export.errors import CheckpointError, OutputError, RecipeError
from g3n_export.layout import is_unused_kv_name, layer_index, tower_group
from g3n_export.matformer import SlicePlan, effective_parameters
from g3n_export.memory import peak_rss_bytes

log = logging.getLogger(__name__)

SLICE_INFO_FILE = "matformer_slice.json"
DEFAULT_CHUNK_BYTES = 64 * 1024**2
# Processor configs describe the image and audio inputs, so a text-only checkpoint leaves them out.
_MULTIMODAL_FILES = {"preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"}
_TOWER_GROUPS = {"vision_tower", "audio_tower", "multimodal_embedders"}
# The only text tensor whose rows are reordered, because it selects per-layer blocks of rows. Every other tensor keeps
# a prefix of its source rows, so it can be streamed in row blocks.
_ROW_REORDERED = "per_layer_model_projection.weight"


@dataclass(frozen=True)
class SliceItem:
    """One output tensor and where its data comes from."""

    spec: TensorSpec
    source: TensorInfo
    text_name: str | None  # source name relative to the text prefix; None for a tensor copied unchanged


@dataclass(frozen=True)
class SliceResult:
    """Summary of a finished slice: the output, its size, and the time and memory it took."""

    out: Path
    tensors: int
    nbytes: int
    seconds: float
    peak_rss_bytes: int  # highest RSS sampled while slicing
    process_peak_rss_bytes: int  # peak RSS of the whole process so far (includes imports and earlier work)
    effective_parameters: int


def plan_slice_tensors(
    plan: SlicePlan,
    tensors: Mapping[str, TensorInfo],
    text_prefix: str,
    *,
    text_only: bool = False,
) -> list[SliceItem]:
    """List the output tensors of a slice, checking names and shapes without reading any data.

    Args:
        plan: the validated submodel.
        tensors: every stored tensor of the source, by full name.
        text_prefix: prefix of the text decoder tensors in the source (`model.language_model.` for Google's files).
        text_only: leave out the vision and audio towers and their embedders.

    Returns:
        Text decoder tensors in the submodel's layout order, then the other tensors in source order.

    Raises:
        CheckpointError: the source lacks a tensor the submodel needs, or a tensor does not slice to the expected
            shape.
    """
    text_names = {n[len(text_prefix):]: n for n in tensors if n.startswith(text_prefix) and tower_group(n) == "other"}
    by_target: dict[str, str] = {}
    for name in text_names:
        target = plan.target_name(name)
        if target is not None:
            by_target[target] = name

    target = plan.target
    items: list[SliceItem] = []
    for target_name, shape in plan.target_shapes().items():
        name = by_target.pop(target_name, None)
        if name is None:
            if _is_optional(target_name, target):
                continue  # the source was itself written without the unused k/v weights
            raise CheckpointError(
                f"the source has no tensor for {text_prefix + target_name!r} of the submodel; the checkpoint is "
                "incomplete or was already sliced differently"
            )
        info = tensors[text_names[name]]
        sliced = tuple(plan.slice_tensor(name, torch.empty(info.shape, device="meta")).shape)
        if sliced != shape:
            raise CheckpointError(
                f"tensor {info.name!r} has shape {list(info.shape)}, which slices to {list(sliced)}, but the "
                f"submodel needs {list(shape)}; the checkpoint does not match its config.json"
            )
        items.append(SliceItem(TensorSpec(text_prefix + target_name, info.dtype, shape), info, name))

    # Text tensors outside the standard layout (none in Google's files) are carried with their layer renamed.
    for target_name, name in by_target.items():
        info = tensors[text_names[name]]
        log.warning("carrying unrecognized text tensor %s with its data unchanged", info.name)
        items.append(SliceItem(TensorSpec(text_prefix + target_name, info.dtype, info.shape), info, None))

    for name, info in tensors.items():
        if name.startswith(text_prefix) and tower_group(name) == "other":
            continue
        if text_only and tower_group(name) in _TOWER_GROUPS:
            continue
        items.append(SliceItem(TensorSpec(name, info.dtype, info.shape), info, None))
    return items


def check_slice(
    source: Checkpoint, plan: SlicePlan, out: Path, *, text_only: bool = False, force: bool = False
) -> list[SliceItem]:
    """Run every check `slice_checkpoint` makes before writing, and return the output tensors.

    Raises:
        RecipeError, CheckpointError, OutputError: as `slice_checkpoint`.
    """
    if plan.source != source.text_config:
        raise RecipeError(
            "the slice plan was made for a different model config than the source checkpoint; build it from "
            "source.text_config"
        )
    items = plan_slice_tensors(plan, source.tensors, source.text_prefix, text_only=text_only)
    _check_output(Path(out), source.path, force=force)
    return items


def _is_optional(target_name: str, target) -> bool:
    layer = layer_index(target_name)
    return layer is not None and target.is_kv_shared(layer) and is_unused_kv_name(target_name)


def slice_config(plan: SlicePlan, source_config: dict, *, text_only: bool) -> dict:
    """Return the submodel's `config.json`: the multimodal wrapper kept, or a `gemma3n_text` config when text-only."""
    if not text_only or source_config.get("model_type") == "gemma3n_text":
        return plan.config_dict(source_config)
    text = plan.text_updates(json.loads(json.dumps(text_config_dict(source_config))))
    text["model_type"] = "gemma3n_text"
    text["architectures"] = ["Gemma3nForCausalLM"]
    # The wrapper, not its text_config, records the dtype and the writing transformers version.
    for key in ("dtype", "torch_dtype", "transformers_version"):
        if key in source_config and key not in text:
            text[key] = source_config[key]
    return text


def slice_checkpoint(
    source: Checkpoint,
    plan: SlicePlan,
    out: Path,
    *,
    text_only: bool = False,
    force: bool = False,
    recipe_name: str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> SliceResult:
    """Write the submodel `plan` of `source` to `out` as a complete Hugging Face checkpoint.

    Everything is checked before the first byte is written: the plan against the source, every tensor's presence
    and shape, the output folder and the free disk space. The output is written to a temporary folder that is
    renamed into place at the end, so a failure leaves no partial checkpoint.

    Args:
        source: the full model.
        plan: the submodel, made for `source.text_config` (see `SizeRecipe.plan` or `make_plan`).
        out: output folder.
        text_only: leave out the vision and audio towers and write a text-only `gemma3n_text` config.
        force: replace an existing `out`.
        recipe_name: recorded in `matformer_slice.json` next to the weights.
        max_shard_bytes: size limit of one safetensors shard.
        chunk_bytes: size of the row blocks in which large tensors are read and written.
        progress: called with the number of bytes written after each block.

    Raises:
        RecipeError: the plan was made for another config.
        CheckpointError: the source lacks a tensor or has a wrong shape.
        OutputError: `out` exists without `force`, contains the source, or its disk is too small.
    """
    started = time.perf_counter()
    out = Path(out)
    items = check_slice(source, plan, out, text_only=text_only, force=force)
    total = sum(item.spec.nbytes for item in items)

    config = slice_config(plan, source.config_dict, text_only=text_only)
    extra = [f for f in source.extra_files() if f.name != SLICE_INFO_FILE]
    if text_only:
        extra = [f for f in extra if f.name not in _MULTIMODAL_FILES]
    effective = effective_parameters(plan.target)
    log.debug(
        "slicing %s: %d of %d layers kept, %d tensors, %.2f GiB to write",
        source.path, len(plan.kept), plan.source.num_hidden_layers, len(items), total / 1024**3,
    )

    process = psutil.Process()
    peak = process.memory_info().rss

    def on_bytes(n: int) -> None:
        nonlocal peak
        peak = max(peak, process.memory_info().rss)
        if progress is not None:
            progress(n)

    items_by_name = {item.spec.name: item for item in items}

    def produce(spec: TensorSpec) -> Iterator[torch.Tensor]:
        return _stream_tensor(items_by_name[spec.name], plan, chunk_bytes)

    with tempfile.TemporaryDirectory() as tmp:
        info_file = Path(tmp) / SLICE_INFO_FILE
        info_file.write_text(json.dumps(_slice_info(plan, source, recipe_name, text_only, effective), indent=2) + "\n")
        write_checkpoint(
            out, config, [item.spec for item in items], produce,
            extra_files=[*extra, info_file], max_shard_bytes=max_shard_bytes, force=force, progress=on_bytes,
        )

    return SliceResult(
        out=out,
        tensors=len(items),
        nbytes=total,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak,
        process_peak_rss_bytes=peak_rss_bytes(),
        effective_parameters=effective,
    )


def _stream_tensor(item: SliceItem, plan: SlicePlan, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """Yield the output tensor of `item` in blocks of rows of at most about `chunk_bytes`."""
    info = item.source
    rows = item.spec.shape[0] if item.spec.shape else 1
    if item.text_name == _ROW_REORDERED or info.nbytes <= chunk_bytes or len(info.shape) < 2:
        whole = _read_rows(info, 0, info.shape[0] if info.shape else None)
        yield whole if item.text_name is None else plan.slice_tensor(item.text_name, whole)
        return

    # Output rows are the first `rows` source rows (all of them, or the FFN prefix of gate/up), each cut on its
    # own, so a block of source rows gives the matching block of output rows.
    row_bytes = info.nbytes // info.shape[0]
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, step):
        block = _read_rows(info, start, min(rows, start + step))
        yield block if item.text_name is None else plan.slice_tensor(item.text_name, block)


def _read_rows(info: TensorInfo, start: int, stop: int | None) -> torch.Tensor:
    # The file is opened for each read so that no memory map stays alive: pages read through a long-lived map
    # count towards RSS until it is closed.
    with safe_open(str(info.file), framework="pt") as f:
        if stop is None or (start == 0 and stop == info.shape[0]):
            return f.get_tensor(info.name)
        return f.get_slice(info.name)[start:stop]


def _check_output(out: Path, source: Path, *, force: bool) -> None:
    # write_checkpoint repeats the first check and also checks the free disk space. Replacing the source itself, or
    # a folder that contains it, would delete the data being read.
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; choose another --out or pass --force to replace it")
    out_resolved = out.expanduser().resolve()
    source_resolved = source.resolve()
    if out_resolved == source_resolved or out_resolved in source_resolved.parents:
        raise OutputError(f"--out {out} would replace the source checkpoint {source}; choose another folder")


def _slice_info(plan: SlicePlan, source: Checkpoint, recipe_name: str | None, text_only: bool, effective: int) -> dict:
    return {
        "recipe": recipe_name,
        "source": str(source.path.resolve()),
        "source_num_hidden_layers": plan.source.num_hidden_layers,
        "layers_to_skip": list(plan.skipped),
        "kept_layers": list(plan.kept),
        "ffn_widths": list(plan.ffn_widths),
        "drop_unused_kv": plan.drop_unused_kv,
        "text_only": text_only,
        "effective_parameters": effective,
    }
