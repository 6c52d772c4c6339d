"""Quantization of the decoder's tensor groups: per-row embedding tables and torchao linear layers.

Embedding tables (the token embedding and the PLE table) are only ever gathered row by row, so they are quantized per
row: each row is split into groups of `group_size` values, and each group gets one symmetric float32 scale (no zero
point). The functions below are plain torch and shared by every target. Each target stores `qvals` and `scales` in
its own format and gathers rows with its runtime's kernel.

Layouts (R rows, C values per row, G = C / group_size groups per row):

* int8: `qvals` int8 `[R, C]` in [-127, 127]; value = qvals * scale.
* int4: `qvals` uint8 `[R, C / 2]`, two values per byte, value q in [-7, 7] stored as q + 8: the even column in the
  high nibble, the odd column in the low nibble (the layout of ExecuTorch's `quantized_decomposed::embedding_4bit`).
* `scales` float32 `[R, G]`.

The largest table, Gemma 3n E4B's PLE table, has 262,144 x 8,960 = 2,348,810,240 values, more than an int32 can
index. Every function here addresses rows of a 2-D tensor with int64 row ids and never forms a flat element offset,
so nothing overflows; `row_offsets` gives the int64 byte offsets for code that reads the table from a file.

Linear layers are quantized with torchao (`quantize_linear`): `8da4w` (int8 dynamic activations, int4 weights in
groups along the input dimension) and `8da8w` (int8 weights, one scale per output channel), the schemes ExecuTorch's
XNNPACK backend lowers to its dynamically quantized fully-connected kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TABLE_BITS = {"int8": 8, "int4": 4}
# Symmetric ranges; int4 leaves -8 unused so that +-qmax are both reachable with one scale.
_QMAX = {8: 127, 4: 7}
_INT4_OFFSET = 8
# Rows quantized per step, bounding the float32 temporaries when a table is quantized from a checkpoint.
_ROWS_PER_CHUNK = 4096


@dataclass
class QuantizedTable:
    """A per-row, group-wise symmetric quantized 2-D table (see the module docstring for the layouts)."""

    qvals: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int

    @property
    def num_rows(self) -> int:
        return self.qvals.shape[0]

    @property
    def row_width(self) -> int:
        """Values per row after dequantization."""
        return self.qvals.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return self.qvals.numel() * self.qvals.element_size() + self.scales.numel() * self.scales.element_size()


def check_group_size(row_width: int, group_size: int, bits: int) -> None:
    """Raise ValueError when `group_size` does not split a row of `row_width` values into whole groups."""
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if group_size <= 0 or row_width % group_size != 0:
        raise ValueError(f"group_size {group_size} must be positive and divide the row width {row_width}")
    if bits == 4 and group_size % 2 != 0:
        raise ValueError(f"int4 packs two values per byte, so group_size must be even, got {group_size}")


def quantize_rows(rows: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float `[R, C]` block of rows; return `(qvals, scales)` in the module's layout.

    A group of zeros gets scale 1 (its values quantize to 0 either way), so no scale is zero or non-finite.
    """
    check_group_size(rows.shape[1], group_size, bits)
    qmax = _QMAX[bits]
    groups = rows.float().reshape(rows.shape[0], -1, group_size)  # shape: [R, G, group_size]
    amax = groups.abs().amax(dim=-1)  # shape: [R, G]
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(groups / scales[..., None]).clamp(-qmax, qmax).to(torch.int8).reshape(rows.shape)
    if bits == 4:
        q = pack_int4(q)
    return q, scales


def quantize_table(table: torch.Tensor, bits: int, group_size: int, *, rows_per_chunk: int = _ROWS_PER_CHUNK) -> QuantizedTable:
    """Quantize a 2-D table in row chunks, so only one chunk is ever held in float32.

    `table` may be a memory-mapped checkpoint tensor of any floating dtype; the output buffers are allocated once.
    """
    if table.dim() != 2:
        raise ValueError(f"expected a 2-D table, got shape {list(table.shape)}")
    num_rows, width = table.shape
    check_group_size(width, group_size, bits)
    packed_width = width // 2 if bits == 4 else width
    qvals = torch.empty(num_rows, packed_width, dtype=torch.uint8 if bits == 4 else torch.int8)
    scales = torch.empty(num_rows, width // group_size, dtype=torch.float32)
    for start in range(0, num_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_rows)
        qvals[start:stop], scales[start:stop] = quantize_rows(table[start:stop], bits, group_size)
    return QuantizedTable(qvals, scales, bits, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] `[R, C]` (C even) into uint8 `[R, C / 2]`, even columns in the high nibble."""
    if q.shape[-1] % 2 != 0:
        raise ValueError(f"int4 packing needs an even row width, got {q.shape[-1]}")
    unsigned = (q.to(torch.int16) + _INT4_OFFSET).to(torch.uint8)
    return (unsigned[..., 0::2] << 4) | unsigned[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Invert `pack_int4`: uint8 `[R, C / 2]` -> int8 `[R, C]` in [-8, 7]."""
    high = (packed >> 4).to(torch.int8) - _INT4_OFFSET
    low = (packed & 0x0F).to(torch.int8) - _INT4_OFFSET
    return torch.stack((high, low), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_rows(qvals: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantize a block of quantized rows `[R, ...]` with its scales `[R, G]` to float32 `[R, C]`."""
    q = unpack_int4(qvals) if bits == 4 else qvals
    groups = q.float().reshape(q.shape[0], scales.shape[1], -1)  # shape: [R, G, group_size]
    return (groups * scales[..., None].float()).reshape(q.shape[0], -1)


def gather_rows(table: QuantizedTable, row_ids: torch.Tensor) -> torch.Tensor:
    """Dequantize the rows `row_ids` (any shape, any integer dtype) of `table`; returns float32 `[*ids, C]`.

    The ids are widened to int64 and select rows of the 2-D tensors, so a table of more than 2^31 values is
    addressed correctly.
    """
    flat = row_ids.reshape(-1).to(torch.int64)
    rows = dequantize_rows(table.qvals.index_select(0, flat), table.scales.index_select(0, flat), table.bits)
    return rows.reshape(*row_ids.shape, table.row_width)


def row_offsets(row_ids: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Return the int64 byte offsets of rows `row_ids` in a row-major table with `row_bytes` bytes per row.

    The ids are widened before the multiplication: in int32, row 262,143 of the E4B PLE table (8,960 bytes per row
    at int8) would overflow.
    """
    return row_ids.to(torch.int64) * int(row_bytes)


def max_abs_error(table: QuantizedTable) -> torch.Tensor:
    """Return the bound on |dequantized - original| per group, `[R, G]`: half a quantization step."""
    return table.scales / 2


# Linear layers ------------------------------------------------------------------------------------------------------

LINEAR_SCHEMES = ("8da4w", "8da8w")


def linear_config(scheme: str, group_size: int):
    """Return the torchao config for `scheme`: `8da4w` with `group_size`-wide int4 groups, or `8da8w` per channel.

    Scales use torchao's "hqq_scale_only" search, which lowers the weight error at the same storage cost.
    """
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    if scheme == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
            intx_choose_qparams_algorithm="hqq_scale_only",
        )
    if scheme == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0), intx_choose_qparams_algorithm="hqq_scale_only",
        )
    raise ValueError(f"unknown linear scheme {scheme!r}; choose one of {', '.join(LINEAR_SCHEMES)}")


def linear_scheme_for(scheme: str, in_features: int, group_size: int) -> str:
    """Return the scheme a linear with `in_features` inputs gets: `8da8w` where int4 groups do not fit its width.

    XNNPACK needs whole groups along the input dimension, so a narrow projection (for example a LAuReL or PLE
    projection narrower than the group) falls back to per-channel int8.
    """
    if scheme == "8da4w" and in_features % group_size != 0:
        return "8da8w"
    return scheme


def quantize_linear(linear: nn.Linear, scheme: str, group_size: int) -> str:
    """Quantize one `nn.Linear` in place with torchao; return the scheme applied (see `linear_scheme_for`)."""
    from torchao.quantization import quantize_

    applied = linear_scheme_for(scheme, linear.in_features, group_size)
    quantize_(linear, linear_config(applied, group_size), filter_fn=lambda module, _name: module is linear)
    return applied
