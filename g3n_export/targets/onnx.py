"""ONNX target: the `embed_tokens` and `decoder_model_merged` graphs, quantized, with ORT-format copies.

Pipeline (each step writes files, so peak memory stays near one graph's size):

1. Export both float32 graphs from `g3n_export.model` with the TorchScript-based `torch.onnx.export`
   (`dynamo=False`), because the dynamo exporter took minutes per graph for a 7-layer toy model in
   `run_decompositions` (torch 2.13, 2 CPU cores), while the traced graph is the same computation.
2. Fold constants and remove redundant nodes with ONNX Runtime's offline optimizer at the basic level, the
   platform-independent level, so the files stay valid for every execution provider.
3. Quantize (`onnx_quant`): `MatMulNBits` for linear layers and the LM head, `GatherBlockQuantized` for the embedding
   tables.
4. Save with external data above a size threshold, check the 2 GiB protobuf limit, convert to ORT format with ONNX
   Runtime's converter and store its mobile usability report.

The graph inputs and outputs follow the export folder contract (see `g3n_export.runtime.onnx` for the names).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from g3n_export.memory import peak_rss_bytes
from g3n_export.runtime.onnx import (
    DECODER_GRAPH,
    EMBED_GRAPH,
    decoder_input_names,
    decoder_output_names,
    past_names,
    present_names,
)
from g3n_export.targets.onnx_quant import TensorQuant, count_ops, quantize_gathers, quantize_matmuls
from g3n_export.targets.recipe import OnnxSpec

log = logging.getLogger(__name__)

# Protocol buffers cannot serialize a message of 2 GiB or more; FlatBuffers (the .ort format) has the same limit.
PROTOBUF_LIMIT = 2**31
# Graphs whose weights exceed this size keep them in a `<graph>.onnx.data` file next to the graph.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 512 * 2**20
MOBILE_REPORT = "mobile_usability.txt"
_BITS = {"int4": 4, "int8": 8}


@dataclass
class OnnxExport:
    """Record of one `export_onnx` run: files written, quantization, timings and memory.

    Attributes:
        out_dir: the folder with the graphs.
        files: relative file name -> size in bytes.
        opset: default-domain opset of both graphs.
        quantization: one entry per tensor group (`TensorQuant.as_dict()`).
        timings: stage -> seconds.
        peak_rss_bytes: peak resident memory of this process at the end of the export.
        mobile_usability: ONNX Runtime's mobile usability report (also in `mobile_usability.txt`), None without ORT.
    """

    out_dir: Path
    files: dict[str, int]
    opset: int
    spec: OnnxSpec
    quantization: list[dict]
    timings: dict[str, float]
    peak_rss_bytes: int
    max_seq_len: int
    kv_layers: list[int]
    mobile_usability: str | None = None
    ort_files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


class EmbedTokensGraph(nn.Module):
    """`input_ids [B, T]` -> `inputs_embeds [B, T, d]`, `per_layer_inputs [B, T, L, P]` (the token-id gathers)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(input_ids)


class DecoderGraph(nn.Module):
    """The decoder with the contract's flat inputs: embeddings, mask, positions, then past key/value pairs.

    `attention_mask` is accepted and unused, because the contract has no padding: every past and new token is
    visible, and the causal and sliding-window masks follow from the positions. `position_ids` rows must be equal
    (the first row is used for every batch entry).
    """

    def __init__(self, functional_decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = functional_decoder

    def forward(self, inputs_embeds, per_layer_inputs, attention_mask, position_ids, *past):
        past_keys, past_values = list(past[0::2]), list(past[1::2])
        logits, present_keys, present_values = self.decoder(
            inputs_embeds, per_layer_inputs, position_ids[0], past_keys, past_values
        )
        outputs = [logits]
        for key, value in zip(present_keys, present_values):
            outputs += [key, value]
        return tuple(outputs)


def export_onnx(
    source,
    out_dir: str | os.PathLike,
    spec: OnnxSpec,
    *,
    max_seq_len: int,
    ort: bool,
    progress: Callable[[str], None] | None = None,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    float_graphs: str | os.PathLike | None = None,
) -> OnnxExport:
    """Write `embed_tokens.onnx` and `decoder_model_merged.onnx` (and `.ort` copies with `ort`) to `out_dir`.

    Args:
        source: a checkpoint folder or Hub id, an open `Checkpoint`, or a `SlicedCheckpoint`.
        out_dir: folder for the graphs; created, existing graph files are replaced.
        spec: quantization settings (linear, block_size, accuracy_level, embedding, ple, opset).
        max_seq_len: recorded for runtimes; the graphs themselves accept any length.
        ort: also convert to ORT format and write ONNX Runtime's mobile usability report.
        progress: called with one line per finished stage.
        external_data_threshold: graphs whose initializers exceed this many bytes get an external `.onnx.data` file.
        float_graphs: a folder from `export_float_graphs` to quantize instead of exporting again (several
            quantization variants of one checkpoint).

    Raises:
        ValueError: a spec value this target cannot write.
        RuntimeError: a file reaches the 2 GiB protobuf limit, or ORT conversion fails.
    """
    _validate_spec(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: log.info("%s", message))
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="g3n-onnx-") as work:
        if float_graphs is None:
            started = time.perf_counter()
            float_graphs = export_float_graphs(source, Path(work), opset=spec.opset)
            timings["export_float"] = time.perf_counter() - started
            say(f"exported float32 ONNX graphs in {timings['export_float']:.1f} s")
        float_graphs = Path(float_graphs)

        started = time.perf_counter()
        embed = onnx.load(float_graphs / f"{EMBED_GRAPH}.onnx")
        embed_quant = _quantize_embed(embed, spec)
        _save_graph(embed, out_dir / f"{EMBED_GRAPH}.onnx", external_data_threshold)
        del embed
        decoder = onnx.load(float_graphs / f"{DECODER_GRAPH}.onnx")
        kv_layers = _kv_layers_of(decoder)
        decoder, linear_quant = _quantize_decoder(decoder, spec)
        _save_graph(decoder, out_dir / f"{DECODER_GRAPH}.onnx", external_data_threshold)
        del decoder
        timings["quantize_and_save"] = time.perf_counter() - started
        say(f"quantized ({spec.precision}: linear {spec.linear}, embedding {spec.embedding}, PLE {spec.ple}) "
            f"and saved in {timings['quantize_and_save']:.1f} s")

    report = None
    ort_files: list[str] = []
    if ort:
        started = time.perf_counter()
        ort_files = convert_to_ort([out_dir / f"{EMBED_GRAPH}.onnx", out_dir / f"{DECODER_GRAPH}.onnx"], out_dir)
        timings["convert_ort"] = time.perf_counter() - started
        report = mobile_usability_report(out_dir / f"{DECODER_GRAPH}.onnx", out_dir / f"{EMBED_GRAPH}.onnx")
        (out_dir / MOBILE_REPORT).write_text(report)
        say(f"converted to ORT format in {timings['convert_ort']:.1f} s; mobile usability report in {MOBILE_REPORT}")

    files = _graph_files(out_dir)
    _check_file_sizes(out_dir, files)
    return OnnxExport(
        out_dir=out_dir,
        files=files,
        opset=spec.opset,
        spec=spec,
        quantization=[q.as_dict() for q in [*linear_quant, *embed_quant]],
        timings=timings,
        peak_rss_bytes=peak_rss_bytes(),
        max_seq_len=max_seq_len,
        kv_layers=kv_layers,
        mobile_usability=report,
        ort_files=ort_files,
    )


def export_float_graphs(source, out_dir: str | os.PathLike, *, opset: int = OnnxSpec.opset) -> Path:
    """Export both graphs in float32 to `out_dir` (optimized at ONNX Runtime's basic level) and return `out_dir`."""
    from g3n_export.checkpoint import open_checkpoint
    from g3n_export.model import Gemma3nDecoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = open_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    # The graphs take the KV history as inputs, so the model's static cache is never used: keep it minimal.
    model = Gemma3nDecoder.from_checkpoint(checkpoint, 1, dtype=torch.float32).eval()
    config = model.config

    with tempfile.TemporaryDirectory(prefix="g3n-onnx-raw-") as raw:
        raw_embed = Path(raw) / f"{EMBED_GRAPH}.onnx"
        raw_decoder = Path(raw) / f"{DECODER_GRAPH}.onnx"
        with torch.no_grad():
            _export_embed(model, raw_embed, opset)
            _export_decoder(model, raw_decoder, opset)
        del model
        _ensure_attention_mask_input(raw_decoder)
        _optimize_basic(raw_embed, out_dir / f"{EMBED_GRAPH}.onnx")
        _optimize_basic(raw_decoder, out_dir / f"{DECODER_GRAPH}.onnx")
    log.info("float32 graphs for %d layers (KV layers %s) in %s", config.num_hidden_layers, config.kv_layers, out_dir)
    return out_dir


def _export_embed(model, path: Path, opset: int) -> None:
    # Example with B=2, T=3: a size-1 example dimension could be traced as a constant.
    input_ids = torch.tensor([[2, 5, 7], [2, 9, 1]], dtype=torch.int64)
    torch.onnx.export(
        EmbedTokensGraph(model.embedder).eval(), (input_ids,), str(path), dynamo=False, opset_version=opset,
        input_names=["input_ids"], output_names=["inputs_embeds", "per_layer_inputs"],
        dynamic_axes={name: {0: "batch_size", 1: "sequence_length"}
                      for name in ("input_ids", "inputs_embeds", "per_layer_inputs")},
        do_constant_folding=True,
    )


def _export_decoder(model, path: Path, opset: int) -> None:
    config = model.config
    kv_layers = list(config.kv_layers)
    batch, new_tokens, past_length = 2, 3, 2
    inputs_embeds = torch.randn(batch, new_tokens, config.hidden_size)
    per_layer_inputs = torch.randn(batch, new_tokens, config.num_hidden_layers, config.hidden_size_per_layer_input)
    attention_mask = torch.ones(batch, past_length + new_tokens, dtype=torch.int64)
    position_ids = torch.arange(past_length, past_length + new_tokens).expand(batch, new_tokens).contiguous()
    past = [torch.randn(batch, config.num_key_value_heads, past_length, config.head_dim) for _ in past_names(kv_layers)]

    dynamic_axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "per_layer_inputs": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    dynamic_axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names(kv_layers)})
    dynamic_axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in present_names(kv_layers)})
    torch.onnx.export(
        DecoderGraph(model.functional()).eval(),
        (inputs_embeds, per_layer_inputs, attention_mask, position_ids, *past),
        str(path), dynamo=False, opset_version=opset,
        input_names=decoder_input_names(kv_layers), output_names=decoder_output_names(kv_layers),
        dynamic_axes=dynamic_axes, do_constant_folding=True,
    )


def _ensure_attention_mask_input(path: Path) -> None:
    # The tracer drops inputs that no node reads; the contract requires attention_mask anyway.
    model = onnx.load(path, load_external_data=False)
    if any(i.name == "attention_mask" for i in model.graph.input):
        return
    mask = onnx.helper.make_tensor_value_info(
        "attention_mask", onnx.TensorProto.INT64, ["batch_size", "total_sequence_length"]
    )
    model.graph.input.insert(2, mask)
    onnx.save(model, path)


def _optimize_basic(source: Path, target: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", target.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _kv_layers_of(decoder: onnx.ModelProto) -> list[int]:
    prefix, suffix = "past_key_values.", ".key"
    return [int(i.name[len(prefix):-len(suffix)]) for i in decoder.graph.input
            if i.name.startswith(prefix) and i.name.endswith(suffix)]


def _quantize_embed(model: onnx.ModelProto, spec: OnnxSpec) -> list[TensorQuant]:
    names = {init.name for init in model.graph.initializer}
    token_table = _one_name(names, "token_embedding.weight")
    ple_table = _one_name(names, "per_layer_embedding.weight")
    result = []
    for table, group, scheme in ((token_table, "token_embedding", spec.embedding),
                                 (ple_table, "per_layer_embedding", spec.ple)):
        if scheme == "fp32":
            result.append(TensorQuant(group, "Gather", 32, None, tensors=1))
            continue
        quantize_gathers(model, {table: group}, _BITS[scheme], spec.block_size)
        result.append(TensorQuant(group, "GatherBlockQuantized", _BITS[scheme], spec.block_size, tensors=1))
    return result


def _quantize_decoder(model: onnx.ModelProto, spec: OnnxSpec) -> tuple[onnx.ModelProto, list[TensorQuant]]:
    # The decoder contains its own copy of the token embedding as the LM head weight, quantized with the linear layers.
    linear = count_ops(model, "MatMul")
    if spec.linear == "fp32":
        return model, [TensorQuant("linear", "MatMul", 32, None, tensors=linear)]
    model = quantize_matmuls(model, _BITS[spec.linear], spec.block_size, spec.accuracy_level)
    quantized = count_ops(model, "MatMulNBits")
    return model, [TensorQuant("linear", "MatMulNBits", _BITS[spec.linear], spec.block_size,
                               accuracy_level=spec.accuracy_level, tensors=quantized)]


def _one_name(names: set[str], suffix: str) -> str:
    matches = [name for name in names if name.endswith(suffix)]
    if len(matches) != 1:
        raise RuntimeError(f"expected one embed_tokens initializer named *{suffix}, found {sorted(matches)}")
    return matches[0]


def _save_graph(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> None:
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    weights = sum(len(init.raw_data) for init in model.graph.initializer)
    if weights > external_data_threshold:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
    else:
        onnx.save_model(model, path)


def convert_to_ort(onnx_paths: list[Path], out_dir: Path) -> list[str]:
    """Convert graphs to ORT format with ONNX Runtime's converter; returns the `.ort` file names written.

    Uses the "Fixed" optimization style for the ARM target platform: optimizations are applied once at conversion,
    without x86-only layouts, which is what a CPU-only ONNX Runtime Mobile build loads.
    """
    written = []
    with tempfile.TemporaryDirectory(prefix="g3n-ort-") as staging:
        for path in onnx_paths:
            # The converter processes every .onnx file in a folder, so each graph gets its own copy of the inputs.
            source_dir = Path(staging) / path.stem
            source_dir.mkdir()
            for file in (path, path.with_name(path.name + ".data")):
                if file.exists():
                    os.symlink(file.resolve(), source_dir / file.name)
            command = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(source_dir),
                       "--output_dir", str(source_dir / "out"), "--optimization_style", "Fixed",
                       "--target_platform", "arm"]
            result = subprocess.run(command, capture_output=True, text=True)
            produced = source_dir / "out" / f"{path.stem}.ort"
            if result.returncode != 0 or not produced.exists():
                raise RuntimeError(
                    f"ORT format conversion of {path.name} failed (exit {result.returncode}): {result.stderr[-2000:]}"
                )
            shutil.move(str(produced), out_dir / produced.name)
            written.append(produced.name)
    return written


def mobile_usability_report(*onnx_paths: Path) -> str:
    """Run ONNX Runtime's mobile usability check on each graph and return the combined output."""
    sections = []
    for path in onnx_paths:
        command = [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mobile usability check of {path.name} failed (exit {result.returncode}): "
                               f"{result.stderr[-2000:]}")
        sections.append(f"== {path.name} ==\n{result.stdout}{result.stderr}")
    return "\n".join(sections)


def _graph_files(out_dir: Path) -> dict[str, int]:
    files = {}
    for graph in (EMBED_GRAPH, DECODER_GRAPH):
        for suffix in (".onnx", ".onnx.data", ".ort"):
            path = out_dir / f"{graph}{suffix}"
            if path.exists():
                files[path.name] = path.stat().st_size
    if (out_dir / MOBILE_REPORT).exists():
        files[MOBILE_REPORT] = (out_dir / MOBILE_REPORT).stat().st_size
    return files


def _check_file_sizes(out_dir: Path, files: dict[str, int]) -> None:
    # External .data files are read by offset, so only the protobuf and FlatBuffers files have the limit.
    too_large = {name: size for name, size in files.items()
                 if name.endswith((".onnx", ".ort")) and size >= PROTOBUF_LIMIT}
    if too_large:
        raise RuntimeError(
            f"{out_dir}: {too_large} reach the 2 GiB protobuf/FlatBuffers limit; lower external_data_threshold "
            "(for .onnx) or quantize the weights further (an .ort file holds all weights)"
        )


def _validate_spec(spec: OnnxSpec) -> None:
    errors = []
    if spec.linear not in ("fp32", *_BITS):
        errors.append(f"linear {spec.linear!r} (expected fp32, int8 or int4)")
    for name in ("embedding", "ple"):
        if getattr(spec, name) not in ("fp32", *_BITS):
            errors.append(f"{name} {getattr(spec, name)!r} (expected fp32, int8 or int4)")
    if spec.block_size < 16 or spec.block_size & (spec.block_size - 1):
        errors.append(f"block_size {spec.block_size} (expected a power of two of at least 16)")
    if spec.accuracy_level not in (0, 1, 2, 3, 4):
        errors.append(f"accuracy_level {spec.accuracy_level} (expected 0 to 4)")
    if errors:
        raise ValueError("invalid ONNX spec: " + "; ".join(errors))
