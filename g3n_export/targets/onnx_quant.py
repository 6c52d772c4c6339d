"""Weight quantization of the exported ONNX graphs with operators that ONNX Runtime's CPU provider implements.

* Linear layers (and the tied LM head in the decoder): `MatMulNBits` (com.microsoft), 4 or 8 bits, block-wise along
  the input dimension with a zero point per block (RTN). Checkpoint weights go through `quantize_matmul_columns`, a
  few output columns at a time, and constants that the graph computes itself (the RoPE rotation, the norms' averaging
  rows) through ONNX Runtime's `MatMulNBitsQuantizer`. Both call the same ONNX Runtime C++ kernels, so they write the
  same bytes. `accuracy_level` 4 lets the kernel quantize activations to int8 and use integer dot products; 0 leaves
  the compute type unset (float32 activations).
* Embedding tables (token embedding and PLE table): `GatherBlockQuantized` (com.microsoft), 4 or 8 bits, block-wise
  along each row with a zero point per block. One operator gathers the quantized rows and dequantizes only those, so
  the float table never exists at run time. ONNX Runtime's quantizer only writes 4-bit gathers, so the tables are
  quantized here with the same asymmetric RTN rule.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Rows quantized per step, so that a 262,144-row table is never copied whole in float32.
_ROWS_PER_CHUNK = 8192


@dataclass(frozen=True)
class TensorQuant:
    """Quantization of one tensor group as recorded in the export report and manifest."""

    group: str  # "linear", "token_embedding" or "per_layer_embedding"
    operator: str  # ONNX operator that consumes the quantized tensor
    bits: int  # 32 for float
    block_size: int | None
    accuracy_level: int | None = None  # MatMulNBits only
    symmetric: bool = False
    tensors: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def quantize_matmuls(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int) -> onnx.ModelProto:
    """Replace every MatMul whose second input is an initializer by `MatMulNBits` (weights stay in `model`).

    Activation-by-activation MatMuls (attention scores) keep float32 because they have no initializer.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
        bits=bits,
    )
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for node in model.graph.node if node.op_type == op_type)


def matmul_nbits_shapes(k: int, n: int, bits: int, block_size: int) -> dict[str, tuple[int, ...]]:
    """Return the shapes of the `MatMulNBits` weight inputs for a `[K, N]` weight: quantized, scales, zero points.

    The dtypes are uint8, float32 and uint8. Each of the N output columns is one row of all three tensors, so a block
    of columns can be written on its own.
    """
    blocks = -(-k // block_size)
    values_per_byte = 8 // bits
    return {
        "quantized": (n, blocks, -(-block_size // values_per_byte)),
        "scales": (n, blocks),
        "zero_points": (n, -(-blocks // values_per_byte)),
    }


def quantize_matmul_columns(
    columns: np.ndarray, bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a block of columns `[K, n]` of a `MatMul` weight `B` to the `MatMulNBits` layout (asymmetric RTN).

    This is what `MatMulNBitsQuantizer` does to a whole weight (ONNX Runtime's `DefaultWeightOnlyQuantizer` in
    QOperator format, asymmetric): pad K to whole blocks with zeros and call ONNX Runtime's C++ block quantizer.
    Each column is quantized on its own, so the rows of the results for a block of columns equal those rows of the
    results for the whole weight.

    Returns:
        (quantized, scales, zero_points) with the shapes of `matmul_nbits_shapes(K, n, bits, block_size)`.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits weights are quantized to 4 or 8 bits here, got {bits}")
    k, n = columns.shape
    shapes = matmul_nbits_shapes(k, n, bits, block_size)
    padded = np.zeros((shapes["scales"][1] * block_size, n), dtype=np.float32)
    padded[:k] = columns
    # The C++ functions write into these arrays, so they must already have the exact dtype and be C-contiguous:
    # pybind11 would otherwise convert them to temporary copies and the results would be lost.
    quantized = np.zeros(shapes["quantized"], dtype=np.uint8)
    scales = np.zeros(shapes["scales"], dtype=np.float32)
    zero_points = np.zeros(shapes["zero_points"], dtype=np.uint8)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(quantized, padded, scales, zero_points, block_size, n, k, False)
    return quantized, scales, zero_points


def matmul_nbits_node(node: onnx.NodeProto, weight: str, k: int, n: int, bits: int, block_size: int,
                      accuracy_level: int) -> onnx.NodeProto:
    """Return the `MatMulNBits` node that replaces `node`, reading `<weight>_Q<bits>`, `_scales`, `_zero_points`.

    Names and attributes follow `MatMulNBitsQuantizer`, so both kinds of quantized MatMul look alike in one graph.
    """
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    # MatMulNBitsQuantizer leaves the optional attribute out for 0, its default.
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return helper.make_node(
        "MatMulNBits",
        [node.input[0], f"{weight}_Q{bits}", f"{weight}_scales", f"{weight}_zero_points"],
        list(node.output),
        name=f"{node.name}_Q{bits}" if node.name else "",
        domain=MS_DOMAIN,
        **attributes,
    )


def quantize_gather_rows(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a float `[V, K]` table block-wise along K (asymmetric RTN, zero included in each block's range).

    Returns:
        (data, scales, zero_points) in `GatherBlockQuantized` layout: uint8 data `[V, K]` for 8 bits or `[V, K/2]`
        for 4 bits (two values per byte, the even column in the low nibble); float32 scales `[V, ceil(K / block)]`;
        uint8 zero points `[V, ceil(K / block)]`, or packed two per byte for 4 bits.
    """
    rows, width = table.shape
    if bits == 4 and width % 2:
        raise ValueError(f"a 4-bit table needs an even row width, got {width}")
    blocks = -(-width // block_size)
    qmax = (1 << bits) - 1
    data = np.empty((rows, width if bits == 8 else width // 2), dtype=np.uint8)
    scales = np.empty((rows, blocks), dtype=np.float32)
    zero_points = np.empty((rows, blocks if bits == 8 else -(-blocks // 2)), dtype=np.uint8)

    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = np.asarray(table[start:start + _ROWS_PER_CHUNK], dtype=np.float32)
        padded = np.zeros((chunk.shape[0], blocks * block_size), dtype=np.float32)
        padded[:, :width] = chunk
        grouped = padded.reshape(chunk.shape[0], blocks, block_size)
        low = np.minimum(grouped.min(axis=2), 0.0)
        high = np.maximum(grouped.max(axis=2), 0.0)
        scale = (high - low) / qmax
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-low / scale), 0, qmax)
        # clip(round(x / scale) + zero, 0, qmax), computed in place in `padded` to hold one float32 copy of the chunk.
        grouped /= scale[:, :, None]
        np.round(grouped, out=grouped)
        grouped += zero[:, :, None]
        np.clip(grouped, 0, qmax, out=grouped)
        quantized = grouped.astype(np.uint8).reshape(chunk.shape[0], -1)[:, :width]

        end = start + chunk.shape[0]
        scales[start:end] = scale
        if bits == 8:
            data[start:end] = quantized
            zero_points[start:end] = zero.astype(np.uint8)
        else:
            data[start:end] = _pack_nibbles(quantized)
            zero_points[start:end] = _pack_nibbles(zero.astype(np.uint8))
    return data, scales, zero_points


def dequantize_gather_rows(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int,
                           block_size: int) -> np.ndarray:
    """Invert `quantize_gather_rows` (the float table the quantized gather reproduces); used by tests."""
    values = data if bits == 8 else _unpack_nibbles(data)
    zeros = zero_points if bits == 8 else _unpack_nibbles(zero_points)[:, :scales.shape[1]]
    width = values.shape[1]
    scale_per_column = np.repeat(scales, block_size, axis=1)[:, :width]
    zero_per_column = np.repeat(zeros.astype(np.float32), block_size, axis=1)[:, :width]
    return (values.astype(np.float32) - zero_per_column) * scale_per_column


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def gather_block_quantized_shapes(rows: int, width: int, bits: int, block_size: int) -> dict[str, tuple[int, ...]]:
    """Return the shapes that `quantize_gather_rows` gives a `[rows, width]` table: quantized, scales, zero points."""
    blocks = -(-width // block_size)
    if bits == 8:
        return {"quantized": (rows, width), "scales": (rows, blocks), "zero_points": (rows, blocks)}
    return {"quantized": (rows, width // 2), "scales": (rows, blocks), "zero_points": (rows, -(-blocks // 2))}


def replace_gathers(model: onnx.ModelProto, table: str, bits: int, block_size: int) -> None:
    """Replace each `Gather` of `table` by a `GatherBlockQuantized` of `<table>_quantized`, `_scales`, `_zero_points`.

    Only the nodes change: the caller adds the three tensors (`quantize_gather_rows` layout) and removes `table`.

    Raises:
        ValueError: an invalid block size, or `table` is read by something other than a Gather along axis 0.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"GatherBlockQuantized needs a power-of-two block size of at least 16, got {block_size}")
    readers = [node for node in model.graph.node if table in node.input]
    if not readers or any(node.op_type != "Gather" or node.input[0] != table for node in readers):
        raise ValueError(f"embedding table {table!r} is read by {[n.op_type for n in readers]}, expected Gather only")
    for node in readers:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            raise ValueError(f"embedding table {table!r} is gathered along axis {axis}, expected 0")
        replacement = helper.make_node(
            "GatherBlockQuantized",
            [f"{table}_quantized", node.input[1], f"{table}_scales", f"{table}_zero_points"],
            list(node.output),
            name=f"{node.name}_quantized",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=block_size,
            bits=bits,
        )
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, replacement)
    add_ms_domain(model)


def add_ms_domain(model: onnx.ModelProto) -> None:
    """Import the com.microsoft opset (version 1), which the quantized operators belong to, unless it is imported."""
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
