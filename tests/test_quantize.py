"""Per-row table quantization, int4 packing, row gathers past 2^31 values, and torchao linear quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from g3n_export.quantize import (
    QuantizedTable,
    check_group_size,
    dequantize_rows,
    gather_rows,
    max_abs_error,
    pack_int4,
    quantize_linear,
    quantize_rows,
    quantize_table,
    row_offsets,
    unpack_int4,
)

# The real E4B PLE table: 262,144 rows of 35 layers x 256 values.
E4B_PLE_ROWS = 262_144
E4B_PLE_WIDTH = 35 * 256


def random_table(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, width, generator=generator) * 0.3
    table[3] = 0.0  # an all-zero row must not produce a zero or non-finite scale
    table[5, :4] = 40.0  # an outlier group must not change the other groups' scales
    return table


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_table_error_within_half_step(bits):
    table = random_table(50, 64)
    quantized = quantize_table(table, bits, group_size=16, rows_per_chunk=7)
    restored = dequantize_rows(quantized.qvals, quantized.scales, bits)
    bound = max_abs_error(quantized).repeat_interleave(16, dim=1)
    error = (restored - table).abs()
    assert torch.isfinite(quantized.scales).all()
    assert (quantized.scales > 0).all()
    assert (error <= bound + 1e-7).all(), f"max error {float((error - bound).max()):.3e} above half a step"
    assert torch.equal(restored[3], torch.zeros(64))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_table_layout(bits):
    quantized = quantize_table(random_table(10, 32), bits, group_size=8)
    assert quantized.qvals.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert quantized.qvals.shape == (10, 16 if bits == 4 else 32)
    assert quantized.scales.shape == (10, 4)
    assert quantized.scales.dtype == torch.float32
    assert quantized.row_width == 32


def test_quantize_table_chunking_matches_one_block():
    table = random_table(37, 32)
    chunked = quantize_table(table, 4, group_size=8, rows_per_chunk=5)
    whole_q, whole_scales = quantize_rows(table, 4, 8)
    assert torch.equal(chunked.qvals, whole_q)
    assert torch.equal(chunked.scales, whole_scales)


def test_outlier_changes_only_its_group():
    quantized = quantize_table(random_table(8, 64), 8, group_size=16)
    assert quantized.scales[5, 0] > 10 * quantized.scales[5, 1:].max()


def test_int4_pack_round_trip():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # shape: [3, 32]
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), values)
    # Even column in the high nibble: -8 -> 0x0, -7 -> 0x1.
    assert int(packed[0, 0]) == 0x01


@pytest.mark.parametrize("bits", [8, 4])
def test_gather_matches_executorch_kernel_reference(bits):
    """ExecuTorch's own definition of the quantized gather must read our layout as we do."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401

    table = quantize_table(random_table(20, 32), bits, group_size=8)
    ids = torch.tensor([[0, 19, 7, 7, 3]])
    if bits == 8:
        expected = torch.ops.quantized_decomposed.embedding_byte.dtype(
            table.qvals, table.scales, None, -128, 127, ids, dtype=torch.float32
        )
    else:
        expected = torch.ops.quantized_decomposed.embedding_4bit.dtype(
            table.qvals, table.scales, None, -8, 7, ids, dtype=torch.float32
        )
    torch.testing.assert_close(gather_rows(table, ids), expected, rtol=0, atol=0)


def test_check_group_size_rejects_partial_groups():
    with pytest.raises(ValueError, match="divide the row width"):
        check_group_size(30, 8, 8)
    with pytest.raises(ValueError, match="even"):
        check_group_size(27, 3, 4)
    with pytest.raises(ValueError, match="bits"):
        check_group_size(32, 8, 2)


def test_row_offsets_past_int32():
    last = torch.tensor([E4B_PLE_ROWS - 1], dtype=torch.int32)
    offsets = row_offsets(last, E4B_PLE_WIDTH)
    assert offsets.dtype == torch.int64
    assert int(offsets[0]) == (E4B_PLE_ROWS - 1) * E4B_PLE_WIDTH
    assert int(offsets[0]) > 2**31


def test_gather_rows_on_e4b_sized_table(tmp_path):
    """Rows past 2^31 values of a real-size int8 table come back intact.

    The table is a sparse file memory-mapped as int8 `[262144, 8960]` (2,348,810,240 values), so only the pages of
    the rows written and read take memory or disk.
    """
    path = tmp_path / "table.bin"
    numel = E4B_PLE_ROWS * E4B_PLE_WIDTH
    assert numel > 2**31
    generator = torch.Generator().manual_seed(0)
    last_row = torch.randint(-127, 128, (E4B_PLE_WIDTH,), dtype=torch.int8, generator=generator)
    middle = 240_000  # the first row whose offset overflows int32 is 239,676
    middle_row = torch.randint(-127, 128, (E4B_PLE_WIDTH,), dtype=torch.int8, generator=generator)
    with path.open("wb") as f:
        f.truncate(numel)
        for row, values in ((E4B_PLE_ROWS - 1, last_row), (middle, middle_row)):
            f.seek(int(row_offsets(torch.tensor(row), E4B_PLE_WIDTH)))
            f.write(values.numpy().tobytes())

    qvals = torch.from_file(str(path), shared=True, size=numel, dtype=torch.int8).view(E4B_PLE_ROWS, E4B_PLE_WIDTH)
    scales = torch.full((E4B_PLE_ROWS, 35), 0.5)
    table = QuantizedTable(qvals, scales, bits=8, group_size=256)
    rows = gather_rows(table, torch.tensor([0, middle, E4B_PLE_ROWS - 1], dtype=torch.int32))
    assert torch.equal(rows[0], torch.zeros(E4B_PLE_WIDTH))
    assert torch.equal(rows[1], middle_row.float() * 0.5)
    assert torch.equal(rows[2], last_row.float() * 0.5)


@pytest.mark.parametrize(
    ("scheme", "in_features", "applied", "rel_tol"),
    [
        ("8da4w", 64, "8da4w", 0.15),
        ("8da8w", 64, "8da8w", 0.02),
        ("8da4w", 48, "8da8w", 0.02),  # 48 inputs cannot hold whole groups of 32
    ],
)
def test_quantize_linear(scheme, in_features, applied, rel_tol):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 24, bias=False)
    x = torch.randn(5, in_features)
    expected = linear(x).detach()
    assert quantize_linear(linear, scheme, group_size=32) == applied
    actual = linear(x).detach()
    relative = float((actual - expected).norm() / expected.norm())
    print(f"{scheme} in={in_features}: applied {applied}, relative error {relative:.3e}")
    assert relative < rel_tol
    assert relative > 0, "the weight was not quantized"
