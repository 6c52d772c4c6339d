"""ONNX target: the `embed_tokens` and `decoder_model_merged` graphs, quantized, with ORT-format copies.

Pipeline (no step holds the model's weights, see `onnx_weights`):

1. Trace both graphs from `g3n_export.model` with the TorchScript-based `torch.onnx.export` (`dynamo=False`), because
   the dynamo exporter took minutes per graph for a 7-layer toy model in `run_decompositions` (torch 2.13, 2 CPU
   cores), while the traced graph is the same computation. The traced model's parameters are zero-stride placeholders
   and become graph inputs. Each traced matmul copies its placeholder to full size for a moment, so the largest one
   (the LM head, 2 GiB in float32 for E2B) sets the peak of this step.
2. Fold constants and remove redundant nodes with ONNX Runtime's offline optimizer at the basic level, the
   platform-independent level, so the files stay valid for every execution provider. The weights are still graph
   inputs at this step, so the optimizer never reads them.
3. Quantize (`onnx_quant`) while streaming the checkpoint into each graph's external data file: `MatMulNBits` for
   linear layers and the LM head, `GatherBlockQuantized` for the embedding tables.
4. Keep the weights inline when they are small, check the 2 GiB protobuf limit, convert to ORT format with ONNX
   Runtime's converter (unless a graph's weights cannot fit one ORT file) and store its mobile usability report.

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
import onnx.version_converter
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
from g3n_export.targets.onnx_quant import TensorQuant, count_ops, quantize_matmuls
from g3n_export.targets.onnx_weights import (
    CheckpointReader,
    ExternalDataWriter,
    WeightSource,
    bind_weights,
    checkpoint_tensor_names,
    fold_weight_transposes,
    move_initializers_to_file,
    parameters_as_inputs,
    read_weight_sources,
    weightless_decoder,
    write_weight_sources,
)
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
        ort_skipped: why the ORT-format conversion was requested but not run, or None.
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
    ort_skipped: str | None = None

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
        ort: also convert to ORT format and write ONNX Runtime's mobile usability report. The conversion is skipped,
            and the reason recorded in `OnnxExport.ort_skipped`, when a graph with its weights reaches 2 GiB.
        progress: called with one line per finished stage.
        external_data_threshold: graphs whose initializers exceed this many bytes get an external `.onnx.data` file.
        float_graphs: a folder from `export_float_graphs` of the same checkpoint, to skip tracing (several
            quantization variants of one checkpoint).

    Raises:
        ValueError: a spec value this target cannot write.
        RuntimeError: a file reaches the 2 GiB protobuf limit, or ORT conversion fails.
    """
    from g3n_export.checkpoint import open_checkpoint

    _validate_spec(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: log.info("%s", message))
    checkpoint = open_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="g3n-onnx-") as work:
        if float_graphs is None:
            started = time.perf_counter()
            float_graphs = export_float_graphs(checkpoint, Path(work), opset=spec.opset)
            timings["export_float"] = time.perf_counter() - started
            say(f"traced and optimized the float32 ONNX graphs (weights as inputs) in {timings['export_float']:.1f} s"
                f"{_peak_note()}")
        float_graphs = Path(float_graphs)

        reader = CheckpointReader(checkpoint)
        started = time.perf_counter()
        embed_quant = _write_embed(float_graphs, out_dir, reader, spec, external_data_threshold)
        timings["weights_embed"] = time.perf_counter() - started
        say(f"wrote {EMBED_GRAPH} (embedding {spec.embedding}, PLE {spec.ple}) in {timings['weights_embed']:.1f} s"
            f"{_peak_note()}")

        started = time.perf_counter()
        linear_quant, kv_layers = _write_decoder(float_graphs, out_dir, reader, spec, external_data_threshold)
        timings["weights_decoder"] = time.perf_counter() - started
        say(f"wrote {DECODER_GRAPH} (linear {spec.linear}, block size {spec.block_size}, accuracy level "
            f"{spec.accuracy_level}) in {timings['weights_decoder']:.1f} s{_peak_note()}")

    report = None
    ort_files: list[str] = []
    ort_skipped = None
    if ort:
        graphs = [out_dir / f"{EMBED_GRAPH}.onnx", out_dir / f"{DECODER_GRAPH}.onnx"]
        ort_skipped = ort_size_problem(graphs)
        if ort_skipped:
            log.warning("skipped the ORT-format conversion: %s", ort_skipped)
        else:
            started = time.perf_counter()
            ort_files = convert_to_ort(graphs, out_dir)
            timings["convert_ort"] = time.perf_counter() - started
            say(f"converted to ORT format in {timings['convert_ort']:.1f} s")
        started = time.perf_counter()
        report = mobile_usability_report(graphs[1], graphs[0])
        (out_dir / MOBILE_REPORT).write_text(report)
        timings["mobile_usability"] = time.perf_counter() - started
        say(f"wrote ONNX Runtime's mobile usability report to {MOBILE_REPORT} in {timings['mobile_usability']:.1f} s")

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
        ort_skipped=ort_skipped,
    )


def _peak_note() -> str:
    return f" (peak RSS {peak_rss_bytes() / 2**30:.2f} GiB)"


# The TorchScript-based exporter writes opsets up to 20 and warns above that. Graphs are traced at 20 and converted
# to the recipe's opset with ONNX's version converter.
TRACER_MAX_OPSET = 20


def export_float_graphs(source, out_dir: str | os.PathLike, *, opset: int = OnnxSpec.opset) -> Path:
    """Export both graphs in float32 to `out_dir`, optimized at ONNX Runtime's basic level, and return `out_dir`.

    The weights are graph inputs here, named after the PyTorch parameters (the LM head's is
    `decoder.stack.lm_head.weight`). `<graph>.weights.json` maps each to its checkpoint tensor (`WeightSource`), and
    `export_onnx` turns them into initializers. Linear weights are declared transposed (`[in, out]`), as MatMul reads
    them. No weight is read from the checkpoint, so this takes about as much memory for E2B as for a toy model.
    """
    from g3n_export.checkpoint import open_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = open_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    config = checkpoint.text_config
    model = weightless_decoder(config)
    tensor_names = checkpoint_tensor_names(model)

    graphs = ((EMBED_GRAPH, EmbedTokensGraph(model.embedder), _export_embed),
              (DECODER_GRAPH, DecoderGraph(model.functional()), _export_decoder))
    with tempfile.TemporaryDirectory(prefix="g3n-onnx-raw-") as raw:
        for graph_name, graph, export in graphs:
            raw_path = Path(raw) / f"{graph_name}.onnx"
            with torch.no_grad(), parameters_as_inputs(graph.eval()) as (traced, parameters):
                dynamic_axes = export(traced, config, parameters, raw_path, min(opset, TRACER_MAX_OPSET))
            weights = {name: WeightSource(tensor_names[id(parameter)]) for name, parameter in parameters}
            weights = _prepare_traced_graph(raw_path, weights, traced.output_shapes, dynamic_axes, opset,
                                            is_decoder=graph_name == DECODER_GRAPH)
            _optimize_basic(raw_path, out_dir / f"{graph_name}.onnx")
            write_weight_sources(out_dir / f"{graph_name}.weights.json", weights)
    log.info("float32 graphs for %d layers (KV layers %s) in %s", config.num_hidden_layers, config.kv_layers, out_dir)
    return out_dir


def _export_embed(traced: nn.Module, config, parameters: list, path: Path, opset: int) -> dict:
    """Export the embed graph with `parameters` as trailing inputs and return its dynamic axes."""
    # Example with B=2, T=3: a size-1 example dimension could be traced as a constant.
    input_ids = torch.tensor([[2, 5, 7], [2, 9, 1]], dtype=torch.int64)
    weight_names = [name for name, _ in parameters]
    dynamic_axes = {name: {0: "batch_size", 1: "sequence_length"}
                    for name in ("input_ids", "inputs_embeds", "per_layer_inputs")}
    torch.onnx.export(
        traced, (input_ids, *[p.detach() for _, p in parameters]), str(path), dynamo=False, opset_version=opset,
        input_names=["input_ids", *weight_names], output_names=["inputs_embeds", "per_layer_inputs"],
        dynamic_axes=dynamic_axes, do_constant_folding=True,
    )
    return dynamic_axes


def _export_decoder(traced: nn.Module, config, parameters: list, path: Path, opset: int) -> dict:
    """Export the decoder graph with `parameters` as trailing inputs and return its dynamic axes."""
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
    weight_names = [name for name, _ in parameters]
    torch.onnx.export(
        traced,
        (inputs_embeds, per_layer_inputs, attention_mask, position_ids, *past, *[p.detach() for _, p in parameters]),
        str(path), dynamo=False, opset_version=opset,
        input_names=[*decoder_input_names(kv_layers), *weight_names], output_names=decoder_output_names(kv_layers),
        dynamic_axes=dynamic_axes, do_constant_folding=True,
    )
    return dynamic_axes


def _prepare_traced_graph(path: Path, weights: dict[str, WeightSource], output_shapes: list[tuple[int, ...]],
                          dynamic_axes: dict, opset: int, *, is_decoder: bool) -> dict[str, WeightSource]:
    model = onnx.load(path)
    if opset > TRACER_MAX_OPSET:
        # The graph has no weights yet, so ONNX's version converter runs on a small model.
        model = onnx.version_converter.convert_version(model, opset)
    weights = fold_weight_transposes(model, weights)
    # The exporter names an output dimension that its shape inference cannot resolve (per_layer_inputs' layer and
    # width dimensions become `Reshapeper_layer_inputs_dim_2`). Every dimension outside dynamic_axes is static, so it
    # gets its traced size.
    for output, shape in zip(model.graph.output, output_shapes):
        dynamic = dynamic_axes.get(output.name, {})
        for position, dim in enumerate(output.type.tensor_type.shape.dim):
            if position not in dynamic:
                dim.dim_value = shape[position]
    # The tracer drops inputs that no node reads; the contract requires attention_mask anyway.
    if is_decoder and not any(i.name == "attention_mask" for i in model.graph.input):
        mask = onnx.helper.make_tensor_value_info(
            "attention_mask", onnx.TensorProto.INT64, ["batch_size", "total_sequence_length"]
        )
        model.graph.input.insert(2, mask)
    onnx.save(model, path)
    return weights


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


def _write_embed(float_graphs: Path, out_dir: Path, reader: CheckpointReader, spec: OnnxSpec,
                 external_data_threshold: int) -> list[TensorQuant]:
    model = onnx.load(float_graphs / f"{EMBED_GRAPH}.onnx")
    weights = read_weight_sources(float_graphs / f"{EMBED_GRAPH}.weights.json")
    tables = {"embed_tokens.weight": ("token_embedding", spec.embedding),
              "embed_tokens_per_layer.weight": ("per_layer_embedding", spec.ple)}
    missing = sorted(set(tables) - {source.tensor for source in weights.values()})
    if missing:
        raise RuntimeError(f"{EMBED_GRAPH} has no weight input for the checkpoint tables {missing}")
    table_bits = {tensor: _BITS.get(scheme) for tensor, (_, scheme) in tables.items()}
    _bind_and_save(model, weights, reader, out_dir / f"{EMBED_GRAPH}.onnx", external_data_threshold,
                   linear_bits=None, table_bits=table_bits, spec=spec)

    result = []
    for group, scheme in tables.values():
        if scheme == "fp32":
            result.append(TensorQuant(group, "Gather", 32, None, tensors=1))
        else:
            result.append(TensorQuant(group, "GatherBlockQuantized", _BITS[scheme], spec.block_size, tensors=1))
    return result


def _write_decoder(float_graphs: Path, out_dir: Path, reader: CheckpointReader, spec: OnnxSpec,
                   external_data_threshold: int) -> tuple[list[TensorQuant], list[int]]:
    model = onnx.load(float_graphs / f"{DECODER_GRAPH}.onnx")
    weights = read_weight_sources(float_graphs / f"{DECODER_GRAPH}.weights.json")
    kv_layers = _kv_layers_of(model)
    # The decoder contains its own copy of the token embedding as the LM head weight, quantized with the linear layers.
    linear_bits = _BITS.get(spec.linear)
    if linear_bits is not None:
        # Constants the graph computes itself (the RoPE rotation, the norms' averaging rows) are initializers
        # already, and ONNX Runtime's quantizer handles them as it handles every weight of an in-memory model.
        model = quantize_matmuls(model, linear_bits, spec.block_size, spec.accuracy_level)
    _bind_and_save(model, weights, reader, out_dir / f"{DECODER_GRAPH}.onnx", external_data_threshold,
                   linear_bits=linear_bits, table_bits={}, spec=spec)

    if linear_bits is None:
        return [TensorQuant("linear", "MatMul", 32, None, tensors=count_ops(model, "MatMul"))], kv_layers
    quantized = count_ops(model, "MatMulNBits")
    return [TensorQuant("linear", "MatMulNBits", linear_bits, spec.block_size, accuracy_level=spec.accuracy_level,
                        tensors=quantized)], kv_layers


def _bind_and_save(model: onnx.ModelProto, weights: dict[str, WeightSource], reader: CheckpointReader, path: Path,
                   external_data_threshold: int, *, linear_bits: int | None, table_bits: dict[str, int | None],
                   spec: OnnxSpec) -> None:
    data_path = path.with_name(path.name + ".data")
    with ExternalDataWriter(data_path) as writer:
        bound = bind_weights(model, weights, reader, writer, linear_bits=linear_bits, table_bits=table_bits,
                             block_size=spec.block_size, accuracy_level=spec.accuracy_level)
        move_initializers_to_file(model, writer)
        data_bytes = writer.size
    onnx.save_model(model, path)
    log.info("%s: %d MatMulNBits weights, %d quantized tables, %d float32 weights; %.1f MiB of weights",
             path.name, bound.matmul_nbits, len(bound.gather_block_quantized), bound.float32, data_bytes / 2**20)
    if data_bytes <= external_data_threshold:
        # Small enough to keep inline: one file is simpler to ship, and loading it needs at most the threshold.
        onnx.save_model(onnx.load(path), path)
        data_path.unlink()


def ort_size_problem(onnx_paths: list[Path]) -> str | None:
    """Return why these graphs cannot be converted to ORT format, or None when each fits.

    An ORT-format file stores a graph with all its weights in one FlatBuffers buffer, and FlatBuffers cannot address
    2 GiB or more. The size of `.onnx` plus `.onnx.data` estimates the ORT file (the data file also contains alignment
    padding, so the estimate errs on the large side by at most 64 KiB per tensor).
    """
    too_large = {}
    for path in onnx_paths:
        size = graph_bytes(path)
        if size >= PROTOBUF_LIMIT:
            too_large[path.name] = size
    if not too_large:
        return None
    sizes = ", ".join(f"{name} with its weights takes {size / 2**30:.2f} GiB" for name, size in too_large.items())
    return (f"{sizes}, but an ORT-format file holds all weights of its graph and must stay under 2 GiB; "
            "quantize the large tensors to fewer bits (for example int4 linear layers and an int4 PLE table) to get "
            "ORT-format files, or ship the .onnx files")


def graph_bytes(onnx_path: Path) -> int:
    """Return the bytes of a graph with its weights: the `.onnx` file plus its `.onnx.data` file, if any."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


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
    """Run ONNX Runtime's mobile usability check on each graph and return the combined output.

    A graph of 2 GiB or more with its weights is not checked, and its section gives the reason: the checker loads the
    weights into one protobuf message for shape inference, which cannot be serialized at that size.
    """
    sections = []
    for path in onnx_paths:
        size = graph_bytes(path)
        if size >= PROTOBUF_LIMIT:
            sections.append(f"== {path.name} ==\nnot checked: with its weights the graph takes {size / 2**30:.2f} GiB, "
                            "and ONNX Runtime's checker serializes it into one protobuf message, which must stay under "
                            "2 GiB\n")
            log.warning("skipped the mobile usability check of %s (%.2f GiB with its weights)", path.name,
                        size / 2**30)
            continue
        # Run beside the file with its bare name: the export is written in a temporary folder that is renamed at the
        # end, and the report would otherwise name that folder.
        command = [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", path.name]
        result = subprocess.run(command, capture_output=True, text=True, cwd=path.parent)
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
