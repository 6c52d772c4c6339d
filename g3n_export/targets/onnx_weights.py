"""ONNX graph weights without a float32 model in memory: graphs traced with weights as inputs, weights streamed in.

A float32 Gemma 3n E2B text decoder takes about 18 GB, so the ONNX target never builds one:

1. `weightless_decoder` builds `Gemma3nDecoder` with every parameter a zero-stride placeholder of its real shape
   (one stored float each). Tracing it with `parameters_as_inputs` records each parameter as a graph input named
   after the parameter, and `fold_weight_transposes` removes the `Transpose` in front of every linear weight by
   declaring the input transposed (`WeightSource.transposed`).
2. `bind_weights` turns those inputs into initializers in the graph's external data file. It reads each checkpoint
   tensor a block of rows at a time and quantizes or casts the block before it reads the next one: `MatMulNBits`
   for linear weights, `GatherBlockQuantized` for embedding tables, float32 for the rest.

A block holds at most `BLOCK_BYTES` of float32. One case reads a whole tensor: a float32 (unquantized) linear weight,
whose transposed layout needs every row of the checkpoint tensor for each output row. That tensor is held in its
stored dtype (bfloat16 in the released checkpoints) and cast a block at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from g3n_export.config import TextConfig
from g3n_export.layout import text_shapes
from g3n_export.targets.onnx_quant import (
    add_ms_domain,
    gather_block_quantized_shapes,
    matmul_nbits_node,
    matmul_nbits_shapes,
    quantize_gather_rows,
    quantize_matmul_columns,
    replace_gathers,
)

# Float32 bytes read, converted and quantized per step.
BLOCK_BYTES = 16 * 2**20
# Initializers below this size stay in the graph file, as with `onnx.save_model(size_threshold=1024)`.
MIN_EXTERNAL_BYTES = 1024
# Tensors above 1 MiB start at a multiple of 64 KiB, so that a runtime can memory-map each one on its own (64 KiB is
# the Windows allocation granularity and a multiple of the page size elsewhere). onnx_ir's external data writer
# (onnx_ir/external_data.py) uses the same two numbers.
_ALIGN_ABOVE_BYTES = 2**20
_ALIGNMENT = 64 * 2**10


@dataclass(frozen=True)
class WeightSource:
    """The checkpoint tensor behind one weight input of a graph.

    Attributes:
        tensor: checkpoint text tensor name (relative to the text prefix), for example `layers.0.mlp.up_proj.weight`.
        transposed: the graph reads the tensor transposed (`[in, out]` for a linear weight stored `[out, in]`).
    """

    tensor: str
    transposed: bool = False


# Tracing


def weightless_decoder(config: TextConfig) -> nn.Module:
    """Return `Gemma3nDecoder` for `config` whose parameters are zero-stride placeholders of their real shapes.

    Buffers (RoPE frequencies, norm rows, AltUp selectors) are real, because the traced graphs keep them as
    constants. The AltUp coefficient tensors hold a few dozen real floats each, because the loader clips them.
    """
    from g3n_export.model import Gemma3nDecoder
    from g3n_export.model.weights import load_hf_weights

    shapes = text_shapes(config, include_unused_kv=False)

    def placeholder(name: str) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32).expand(shapes[name])

    return load_hf_weights(Gemma3nDecoder, config, placeholder, max_seq_len=1, dtype=torch.float32,
                           max_batch_size=1, source="zero-stride placeholders")


def checkpoint_tensor_names(model: nn.Module) -> dict[int, str]:
    """Return `id(parameter)` -> checkpoint text name for every parameter of a `Gemma3nDecoder`.

    Keyed by identity so that a parameter found under another module path (the LM head, which is the token
    embedding) maps to the tensor it was loaded from.
    """
    from g3n_export.model.weights import hf_name_map

    names = hf_name_map(model.config)
    return {id(parameter): names[name] for name, parameter in model.named_parameters(remove_duplicate=False)
            if name in names}


class _ParametersAsInputs(nn.Module):
    """Call `graph` with its parameters set from the trailing forward arguments (see `parameters_as_inputs`)."""

    def __init__(self, graph: nn.Module, slots: list[list[tuple[nn.Module, str]]]) -> None:
        super().__init__()
        self.graph = graph
        self.slots = slots
        self.output_shapes: list[tuple[int, ...]] = []  # of the last call, for the exported graph's output types

    def forward(self, *args):
        inputs, weights = args[:-len(self.slots)], args[-len(self.slots):]
        for slots, weight in zip(self.slots, weights):
            for module, attribute in slots:
                setattr(module, attribute, weight)
        outputs = self.graph(*inputs)
        self.output_shapes = [tuple(output.shape) for output in outputs]
        return outputs


@contextmanager
def parameters_as_inputs(graph: nn.Module) -> Iterator[tuple[nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Yield a module that takes the parameters of `graph` as trailing arguments, and those (name, parameter) pairs.

    The TorchScript ONNX exporter serializes every parameter for its per-node shape inference, which copies a
    zero-stride placeholder into a full-size buffer (torch 2.13: a 6.3 GiB peak for E2B's embedding graph alone).
    Traced inputs are described by shape only. `graph` gets its parameters back when the context closes.
    """
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    parameters: list[tuple[str, nn.Parameter]] = []
    for name, parameter in graph.named_parameters(remove_duplicate=False):
        module_name, _, attribute = name.rpartition(".")
        if id(parameter) not in slots:
            slots[id(parameter)] = []
            parameters.append((name, parameter))
        slots[id(parameter)].append((graph.get_submodule(module_name), attribute))
    for module_slots in slots.values():
        for module, attribute in module_slots:
            del module._parameters[attribute]
    try:
        yield _ParametersAsInputs(graph, list(slots.values())), parameters
    finally:
        for (_, parameter), module_slots in zip(parameters, slots.values()):
            for module, attribute in module_slots:
                module.__dict__.pop(attribute, None)
                module._parameters[attribute] = parameter


def fold_weight_transposes(model: onnx.ModelProto, weights: dict[str, WeightSource]) -> dict[str, WeightSource]:
    """Replace `Transpose(weight)` by a transposed weight input and return the updated weight sources.

    The exporter writes `nn.Linear` as `MatMul(x, Transpose(W))`. With real weights it folds the Transpose into a
    constant, which a graph with weight inputs cannot do. A weight that is also read untransposed keeps its input,
    and its transposed copy becomes a second input named `<weight>_transposed`.
    """
    graph = model.graph
    inputs = {value.name: value for value in graph.input}
    # One index of readers instead of a scan per weight: E2B's decoder has about 12,000 nodes and 700 weights.
    readers_of = reader_positions(model)
    removed: set[str] = set()
    result = dict(weights)
    for name, source in weights.items():
        readers = [graph.node[position] for position in readers_of.get(name, [])]
        transposes = [node for node in readers if node.op_type == "Transpose" and _is_2d_transpose(node)]
        if not transposes:
            continue
        replaced = {node.output[0] for node in transposes}
        if any(output.name in replaced for output in graph.output):
            raise ValueError(f"a graph output is the transposed weight {name!r}; only node inputs can be rewired")
        if len(transposes) == len(readers):
            transposed_name = name
        else:
            transposed_name = f"{name}_transposed"
            graph.input.append(onnx.ValueInfoProto())
            graph.input[-1].CopyFrom(inputs[name])
            graph.input[-1].name = transposed_name
        value = next(value for value in graph.input if value.name == transposed_name)
        dims = value.type.tensor_type.shape.dim
        rows, columns = dims[0].dim_value, dims[1].dim_value
        dims[0].dim_value, dims[1].dim_value = columns, rows
        result[transposed_name] = WeightSource(source.tensor, transposed=not source.transposed)

        for output_name in replaced:
            for position in readers_of.get(output_name, []):
                node = graph.node[position]
                for input_position, input_name in enumerate(node.input):
                    if input_name == output_name:
                        node.input[input_position] = transposed_name
        removed |= replaced

    remaining = [node for node in graph.node if not (node.op_type == "Transpose" and node.output[0] in removed)]
    del graph.node[:]
    graph.node.extend(remaining)
    return result


def reader_positions(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Return value name -> positions in `model.graph.node` of the nodes that read it, each position once."""
    positions: dict[str, list[int]] = {}
    for position, node in enumerate(model.graph.node):
        for name in dict.fromkeys(node.input):
            positions.setdefault(name, []).append(position)
    return positions


def _is_2d_transpose(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm == [1, 0]


def write_weight_sources(path: Path, weights: dict[str, WeightSource]) -> None:
    path.write_text(json.dumps({name: asdict(source) for name, source in weights.items()}, indent=1))


def read_weight_sources(path: Path) -> dict[str, WeightSource]:
    return {name: WeightSource(**entry) for name, entry in json.loads(path.read_text()).items()}


# Streaming the checkpoint


class ExternalDataWriter:
    """One `.onnx.data` file under construction: space is reserved per tensor, then filled in blocks of rows.

    Each reserved tensor yields a `TensorProto` with `data_location = EXTERNAL`, so the graph proto stays small.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.size = 0
        self._file = open(self.path, "wb")

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            # Reserved space at the end that was never written must still be part of the file.
            self._file.truncate(self.size)
            self._file.close()

    def reserve(self, name: str, data_type: int, shape: tuple[int, ...]) -> TensorRegion:
        """Reserve the bytes of one tensor and return its region (the tensor proto and a row writer)."""
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
        length = int(np.prod(shape, dtype=np.int64)) * itemsize
        offset = self.size
        if length > _ALIGN_ABOVE_BYTES:
            offset = -(-offset // _ALIGNMENT) * _ALIGNMENT
        self.size = offset + length

        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = data_type
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key = key
            entry.value = value
        row_bytes = length // shape[0] if shape and shape[0] else length
        return TensorRegion(self, tensor, offset, row_bytes)

    def write(self, offset: int, data: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        while view:
            written = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def add(self, tensor: TensorProto) -> TensorProto:
        """Move the raw data of an in-memory tensor to the file and return the tensor, now external."""
        region = self.reserve(tensor.name, tensor.data_type, tuple(tensor.dims))
        self.write(region.offset, np.frombuffer(tensor.raw_data, dtype=np.uint8))
        return region.tensor


@dataclass
class TensorRegion:
    """The bytes reserved for one tensor in an `ExternalDataWriter` file, and the tensor proto that points to them."""

    writer: ExternalDataWriter
    tensor: TensorProto
    offset: int
    row_bytes: int

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write `rows` as the tensor's rows (along its first dimension) from index `start` on."""
        self.writer.write(self.offset + start * self.row_bytes, rows)


class CheckpointReader:
    """Checkpoint text tensors as the decoder loads them (float32, AltUp coefficients clipped), a block at a time."""

    def __init__(self, source) -> None:
        self.source = source
        self.config = source.text_config
        self.shapes = text_shapes(self.config, include_unused_kv=False)

    def prepare(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # The same conversion as `load_hf_weights`, so the graphs compute with the values the PyTorch model has.
        from g3n_export.model.weights import _COEFFICIENT_SUFFIXES

        tensor = tensor.to(torch.float32)
        clip = self.config.altup_coef_clip
        if clip is not None and name.endswith(_COEFFICIENT_SUFFIXES):
            tensor = tensor.clamp(-clip, clip)
        return tensor

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.text_tensor_rows(name, start, stop)

    def row_blocks(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, float32 rows) over the whole tensor in blocks of at most `BLOCK_BYTES` (or one row)."""
        shape = self.shapes[name]
        row_elements = int(np.prod(shape[1:], dtype=np.int64))
        step = max(1, BLOCK_BYTES // (4 * max(1, row_elements)))
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            yield start, self.prepare(name, self.rows(name, start, stop))

    def column_blocks(self, name: str, transposed: bool) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first column, float32 `[K, n]` columns) of `B`, the checkpoint tensor (transposed if `transposed`).

        Columns of a transposed tensor are rows of the stored one, so they are read a block at a time. Otherwise the
        tensor is read whole in its stored dtype.
        """
        if transposed:
            for start, rows in self.row_blocks(name):
                yield start, rows.T.contiguous().numpy()
            return
        rows, columns = self.shapes[name]
        whole = self.rows(name, 0, rows)
        step = max(1, BLOCK_BYTES // (4 * rows))
        for start in range(0, columns, step):
            yield start, self.prepare(name, whole[:, start:start + step]).contiguous().numpy()


@dataclass
class BoundWeights:
    """Counts of the weights `bind_weights` wrote, per kind, for the log."""

    matmul_nbits: int = 0  # weights written as MatMulNBits inputs
    gather_block_quantized: dict[str, int] = field(default_factory=dict)  # checkpoint table name -> bits
    float32: int = 0


def bind_weights(
    model: onnx.ModelProto,
    weights: dict[str, WeightSource],
    reader: CheckpointReader,
    writer: ExternalDataWriter,
    *,
    linear_bits: int | None,
    table_bits: dict[str, int | None],
    block_size: int,
    accuracy_level: int,
) -> BoundWeights:
    """Replace each weight input of `model` by initializers in `writer`'s file, quantized as requested.

    Args:
        model: a graph from `fold_weight_transposes`, changed in place.
        weights: its weight inputs.
        reader: the checkpoint.
        writer: the graph's external data file.
        linear_bits: 4 or 8 to write every weight that only MatMuls read as `MatMulNBits`; None keeps float32.
        table_bits: checkpoint table name -> 4 or 8 to write it for `GatherBlockQuantized`, or None for float32.
        block_size: quantization block along the input dimension (MatMulNBits) or the row (GatherBlockQuantized).
        accuracy_level: MatMulNBits `accuracy_level`.
    """
    bound = BoundWeights()
    declared = {value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in model.graph.input}
    # Replacing a node keeps its position, so the index stays valid while weights are bound.
    readers_of = reader_positions(model)
    for name, source in weights.items():
        stored = list(reader.shapes[source.tensor])
        expected = stored[::-1] if source.transposed else stored
        if declared.get(name) != expected:
            raise ValueError(
                f"weight input {name!r} has shape {declared.get(name)}, but checkpoint tensor {source.tensor!r} gives "
                f"{expected}; the graphs were exported from another checkpoint, so export them again from this one"
            )
        positions = readers_of.get(name, [])
        readers = [model.graph.node[position] for position in positions]
        bits = table_bits.get(source.tensor)
        if readers and all(node.op_type == "MatMul" and list(node.input).index(name) == 1 for node in readers) \
                and linear_bits is not None:
            _write_matmul_nbits(model, name, source, positions, reader, writer, linear_bits, block_size,
                                accuracy_level)
            bound.matmul_nbits += 1
        elif readers and all(node.op_type == "Gather" for node in readers) and bits is not None:
            if source.transposed:
                raise ValueError(f"embedding table {name!r} is read transposed, which GatherBlockQuantized cannot do")
            _write_gather_block_quantized(model, name, source, reader, writer, bits, block_size)
            bound.gather_block_quantized[source.tensor] = bits
        else:
            model.graph.initializer.append(_write_float(name, source, reader, writer))
            bound.float32 += 1
        _remove_input(model, name)
    return bound


def _write_matmul_nbits(model, name, source, positions, reader, writer, bits, block_size, accuracy_level) -> None:
    rows, columns = reader.shapes[source.tensor]
    k, n = (columns, rows) if source.transposed else (rows, columns)
    shapes = matmul_nbits_shapes(k, n, bits, block_size)
    quantized = writer.reserve(f"{name}_Q{bits}", TensorProto.UINT8, shapes["quantized"])
    scales = writer.reserve(f"{name}_scales", TensorProto.FLOAT, shapes["scales"])
    zero_points = writer.reserve(f"{name}_zero_points", TensorProto.UINT8, shapes["zero_points"])
    for start, block in reader.column_blocks(source.tensor, source.transposed):
        block_quantized, block_scales, block_zero_points = quantize_matmul_columns(block, bits, block_size)
        quantized.write_rows(start, block_quantized)
        scales.write_rows(start, block_scales)
        zero_points.write_rows(start, block_zero_points)
    model.graph.initializer.extend([quantized.tensor, scales.tensor, zero_points.tensor])

    for position in positions:
        node = model.graph.node[position]
        model.graph.node[position].CopyFrom(matmul_nbits_node(node, name, k, n, bits, block_size, accuracy_level))
    add_ms_domain(model)


def _write_gather_block_quantized(model, name, source, reader, writer, bits, block_size) -> None:
    rows, width = reader.shapes[source.tensor]
    shapes = gather_block_quantized_shapes(rows, width, bits, block_size)
    quantized = writer.reserve(f"{name}_quantized", TensorProto.UINT8, shapes["quantized"])
    scales = writer.reserve(f"{name}_scales", TensorProto.FLOAT, shapes["scales"])
    zero_points = writer.reserve(f"{name}_zero_points", TensorProto.UINT8, shapes["zero_points"])
    for start, block in reader.row_blocks(source.tensor):
        block_quantized, block_scales, block_zero_points = quantize_gather_rows(block.numpy(), bits, block_size)
        quantized.write_rows(start, block_quantized)
        scales.write_rows(start, block_scales)
        zero_points.write_rows(start, block_zero_points)
    model.graph.initializer.extend([quantized.tensor, scales.tensor, zero_points.tensor])
    replace_gathers(model, name, bits, block_size)


def _write_float(name: str, source: WeightSource, reader: CheckpointReader, writer: ExternalDataWriter) -> TensorProto:
    shape = reader.shapes[source.tensor]
    if not source.transposed:
        region = writer.reserve(name, TensorProto.FLOAT, shape)
        for start, block in reader.row_blocks(source.tensor):
            region.write_rows(start, block.numpy())
        return region.tensor
    # Rows of the transposed tensor are columns of the stored one: its column blocks are the rows to write.
    region = writer.reserve(name, TensorProto.FLOAT, (shape[1], shape[0]))
    for start, columns in reader.column_blocks(source.tensor, transposed=False):
        region.write_rows(start, columns.T)
    return region.tensor


def _remove_input(model: onnx.ModelProto, name: str) -> None:
    for position, value in enumerate(model.graph.input):
        if value.name == name:
            del model.graph.input[position]
            return


def move_initializers_to_file(model: onnx.ModelProto, writer: ExternalDataWriter) -> None:
    """Move every in-memory initializer of at least `MIN_EXTERNAL_BYTES` raw bytes into `writer`'s file."""
    for position, tensor in enumerate(model.graph.initializer):
        if tensor.data_location != TensorProto.EXTERNAL and len(tensor.raw_data) >= MIN_EXTERNAL_BYTES:
            model.graph.initializer[position].CopyFrom(writer.add(tensor))
