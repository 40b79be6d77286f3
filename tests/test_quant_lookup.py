"""The table-driven 4-bit maths (:mod:`loramerge.io.quant.lookup`, :mod:`loramerge.io.quant.bnb4_stream`)
against ``torch.bucketize`` (the search bitsandbytes' reference kernel runs) and against bitsandbytes itself.

Every comparison is of bit patterns, so a -0.0 where bitsandbytes gives +0.0 (FP4 has both codes)
fails. The values probed are the ones a table can get wrong: every midpoint and its neighbours,
ties exactly at a midpoint, both ends of every table cell, subnormals, ±0, all-zero blocks, blocks
whose absmax is subnormal, and infinities in the weight.
"""

from __future__ import annotations

import pytest
import torch

from loramerge.io.quant import bnb4, bnb4_stream, lookup

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and bit patterns (so -0.0 ≠ +0.0; any NaN only where the other has the same NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype]))


def same_but_zero_sign(a: torch.Tensor, b: torch.Tensor) -> bool:
    """:func:`same_bits` once -0.0 is made +0.0: for FP4's code 8, bitsandbytes' own kernels disagree (its
    native CPU and CUDA kernels give -0.0, its Python reference kernel, run for odd row lengths, +0.0)."""
    return same_bits(a + 0.0, b + 0.0)


def neighbours(values: torch.Tensor, steps: int) -> torch.Tensor:
    """Every float32 within ``steps`` ulps of each of ``values`` (finite ones only)."""
    bits = values.float().reshape(-1, 1).view(torch.int32).long()
    offsets = torch.arange(-steps, steps + 1).reshape(1, -1)
    # step through the ordered floats: negative floats' bit patterns run the other way
    signed = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits) + offsets
    back = torch.where(signed < 0, (-signed) | (1 << 31), signed)
    out = back.reshape(-1).to(torch.int64)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32).view(torch.float32)
    return out[torch.isfinite(out)]


def probes(quant_type: str) -> torch.Tensor:
    """Scaled values a table could get wrong: midpoints ± 64 ulps, cell ends ± 1 ulp, zeros, subnormals, ±1."""
    bounds, _ = bnb4._bounds(quant_type)
    cells = torch.arange(lookup.CELLS, dtype=torch.int64) << 16
    ends = torch.cat([cells, cells | 0xFFFF])
    ends = torch.where(ends >= 1 << 31, ends - (1 << 32), ends).to(torch.int32).view(torch.float32)
    ends = ends[torch.isfinite(ends) & (ends.abs() <= 1.0)]
    coarse = torch.arange(1 << lookup.COARSE_BITS, dtype=torch.float64) * (4.0 / (1 << lookup.COARSE_BITS)) - 2.0
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754942e-38, -1.1754942e-38, 1.0, -1.0,
                            1.0000001, -1.0000001])
    values = torch.cat([neighbours(bounds, 64), neighbours(ends, 1), neighbours(coarse.float(), 1), special])
    return values[values.abs() <= 1.0000002]


def reference_positions(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' reference kernel: ``bucketize`` of the clamped values on the midpoints."""
    bounds, _ = bnb4._bounds(quant_type)
    return torch.bucketize(scaled.clamp(-1, 1), bounds)


@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_exact_table_gives_bucketize_for_every_probe(quant_type):
    scaled = probes(quant_type)
    assert scaled.numel() > 500_000
    positions = reference_positions(scaled, quant_type)
    _, order = bnb4._bounds(quant_type)
    table = bnb4.nearest_table(quant_type)
    assert torch.equal(lookup.lookup_codes(scaled, table), order[positions])
    expected = bnb4.code_table(quant_type)[order.long()][positions]
    assert same_bits(lookup.lookup_values(scaled, table), expected)
    # and for random bit patterns of every magnitude up to 1
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 0x3F800001, (2_000_000,), generator=g, dtype=torch.int32)
    signs = torch.randint(0, 2, bits.shape, generator=g, dtype=torch.int32) << 31
    scaled = (bits | signs).view(torch.float32)
    assert torch.equal(lookup.lookup_codes(scaled, table), order[reference_positions(scaled, quant_type)])


def test_ties_go_to_the_lower_code():
    bounds, order = bnb4._bounds("nf4")
    below = bnb4.code_table("nf4")[order.long()][:-1]
    assert same_bits(lookup.lookup_values(bounds.clone(), bnb4.nearest_table("nf4")), below)
    # FP4's midpoint 0 lies between +0 (code 0) and -0 (code 8): 0 itself stays +0, the next float above is -0
    codes = bnb4.nearest_codes(torch.tensor([0.0, -0.0, 1e-45, -1e-45]), "fp4", finite=True)
    assert codes.tolist() == [0, 0, 8, 0]


@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_coarse_table_is_exact_where_it_decides(quant_type):
    scaled = probes(quant_type)
    _, order = bnb4._bounds(quant_type)
    expected = bnb4.code_table(quant_type)[order.long()][reference_positions(scaled, quant_type)]
    coarse = lookup.coarse_values(scaled.clone(), bnb4.coarse_table(quant_type))
    decided = coarse != lookup.UNDECIDED
    assert decided.float().mean() > 0.5  # most probes sit next to a midpoint; of all floats, far more
    assert same_bits(coarse[decided], expected[decided])
    undecided_cells = int((bnb4.coarse_table(quant_type).values == lookup.UNDECIDED).sum())
    assert 15 <= undecided_cells <= 3 * 15


def test_two_midpoints_in_one_cell_are_refused():
    with pytest.raises(ValueError, match="two midpoints"):
        lookup.build_table(torch.tensor([0.5, 0.5000001]), torch.tensor([0.0, 0.5, 1.0]), torch.arange(3))


def test_pair_table_decodes_every_byte():
    for quant_type in bnb4.QUANT_TYPES:
        code = bnb4.code_table(quant_type)
        raw = torch.arange(256, dtype=torch.uint8)
        expected = torch.stack([code[(raw >> 4).long()], code[(raw & 15).long()]], dim=1).reshape(-1)
        assert same_bits(lookup.decode_bytes(raw, lookup.pair_table(code)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_absmax_is_the_float_absmax(dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(50, 64, generator=g) * torch.logspace(-45, 4, 50).unsqueeze(1)).to(dtype)
    w[3] = -0.0
    w[4, 7] = float("-inf")
    assert same_bits(bnb4.rows_absmax(w), w.float().abs().amax(dim=1))


def _hard_weight(dtype: torch.dtype, blocksize: int, quant_type: str, seed: int = 0) -> torch.Tensor:
    """One block per row: ordinary values, exact midpoint ties (absmax a power of two), ±0 and zero blocks,
    subnormals, a subnormal absmax, values one ulp around midpoints."""
    g = torch.Generator().manual_seed(seed)
    bounds, _ = bnb4._bounds(quant_type)

    def block(head: torch.Tensor, scale: float) -> torch.Tensor:
        filler = torch.randn(blocksize - head.numel(), generator=g) * scale * 0.3
        return torch.cat([head.float(), filler])

    rows = []
    for scale in (1.0, 0.25, 3.0, 1e-3):
        ties = torch.cat([bounds, -bounds]) * scale
        row = block(ties.to(dtype), scale)  # exact ties where the dtype holds them (float32), near ties otherwise
        row[-1] = scale  # the absmax: the ties' scale is exactly 1/scale where scale is a power of 2
        rows.append(row)
    rows.append(torch.zeros(blocksize))  # all-zero block: absmax 0, scale floored at 1e-38
    signed_zero = torch.zeros(blocksize)
    signed_zero[::2] = -0.0
    signed_zero[5] = 1e-3
    rows.append(signed_zero)
    tiny = torch.finfo(dtype).smallest_normal
    rows.append(torch.linspace(-4, 4, blocksize) * tiny)  # subnormals and normals near the bottom
    rows.append(torch.linspace(-1, 1, blocksize) * tiny / 8)  # a subnormal absmax
    rows.append(block(neighbours(bounds[:6] * 0.5, 2), 0.5))  # a ulp or two around midpoints
    return torch.stack(rows).to(dtype)


def _bnb_fake(w: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    return bnb_functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_fake_quantize_of_hard_blocks_is_bitsandbytes_bit_for_bit(dtype, quant_type, blocksize):
    w = _hard_weight(dtype, blocksize, quant_type)
    expected = _bnb_fake(w, quant_type, blocksize)
    assert same_bits(bnb4.fake_quantize_4bit(w, quant_type, blocksize), expected)
    flat = w.reshape(-1)
    streamed = bnb4_stream.fake_quantize_range(flat, 0, flat.numel(), quant_type, blocksize)
    assert same_bits(streamed.reshape(w.shape), expected)
    assert same_bits(bnb4.dequantize_4bit(*bnb4.quantize_4bit(w, quant_type, blocksize)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_fake_quantize_of_a_large_weight_is_bitsandbytes_bit_for_bit(dtype, quant_type):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(256, 2048, generator=g) * torch.rand(256, 1, generator=g) * 0.05).to(dtype)
    expected = _bnb_fake(w, quant_type, 64).reshape(-1)
    flat = w.reshape(-1)
    workspace = bnb4_stream.Workspace()
    step = 64 * 2048  # row blocks, as the fold reads them
    for start in range(0, flat.numel(), step):
        part = bnb4_stream.fake_quantize_range(flat[start:start + step], start, flat.numel(), quant_type, 64,
                                               workspace=workspace)
        assert same_bits(part, expected[start:start + step])


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_give_what_bitsandbytes_gives(dtype):
    w = torch.randn(4, 128).to(dtype)
    w[0, 3], w[2, 100] = float("inf"), float("-inf")
    expected = _bnb_fake(w, "nf4", 64)
    got = bnb4_stream.fake_quantize_range(w.reshape(-1), 0, w.numel(), "nf4", 64).reshape(w.shape)
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert same_bits(got[finite], expected[finite])
    assert same_bits(got[1], expected[1]) and same_bits(got[3], expected[3])  # blocks without an inf


@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_slices_of_partial_blocks_and_double_quant(quant_type):
    w = _hard_weight(torch.bfloat16, 64, quant_type).reshape(-1)[: 47 * 12].reshape(-1, 47)  # blocks straddle rows
    flat, total = w.reshape(-1), w.numel()
    absmax = bnb4.block_absmax(flat, 64)
    for double in (False, True):
        scales = bnb4.double_quantize(absmax).dequantize() if double else None
        expected = bnb4.fake_quantize_4bit(w, quant_type, 64, double).reshape(-1)
        if not double:
            assert same_but_zero_sign(expected.reshape(w.shape), _bnb_fake(w, quant_type, 64))
        for start, stop in [(0, 47 * 3), (47 * 3, 47 * 9), (47 * 9, total), (128, 384)]:
            part = bnb4_stream.fake_quantize_range(flat[start:stop], start, total, quant_type, 64, absmax, scales)
            assert same_bits(part, expected[start:stop]), (start, stop, double)
    with pytest.raises(ValueError, match="absmax of the whole weight"):
        bnb4_stream.fake_quantize_range(flat[:47], 0, total, quant_type, 64)


def test_results_without_out_are_fresh_tensors():
    workspace = bnb4_stream.Workspace()
    w = torch.randn(2, 128, dtype=torch.float32).reshape(-1)
    first = bnb4_stream.fake_quantize_range(w[:128], 0, 256, "nf4", 64, workspace=workspace)
    kept = first.clone()
    bnb4_stream.fake_quantize_range(w[128:], 128, 256, "nf4", 64, workspace=workspace)
    assert same_bits(first, kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
@pytest.mark.parametrize("columns", [64, 61])
def test_dequantize_range_is_bitsandbytes_for_any_slice(dtype, quant_type, columns):
    w = _hard_weight(dtype, 64, quant_type).reshape(-1)[: columns * 9].reshape(-1, columns)
    # rows of even length run bitsandbytes' native CPU kernel (the CUDA kernel's values), odd ones its reference
    same = same_bits if columns % 2 == 0 else same_but_zero_sign
    for double in (False, True):
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
        expected = bnb_functional.dequantize_4bit(packed, state).reshape(-1)
        ours = bnb4.state_from_tensors({f"w.{k}": v for k, v in state.as_dict(packed=True).items()}, "w")
        assert same(bnb4.dequantize_4bit(packed, ours).reshape(-1), expected)
        pairs = lookup.pair_table(bnb4.kernel_map(ours.quant_map, quant_type))
        scales, raw = ours.scales(), packed.reshape(-1)
        for first, count in [(0, w.numel()), (61, 122), (64, 128), (3, 200), (w.numel() - 5, 5)]:
            part = bnb4_stream.dequantize_range(raw[first // 2:], first, count, scales, pairs, 64, dtype)
            assert same(part, expected[first:first + count]), (first, count, double)


@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_serialized_quant_map_is_bitsandbytes_bit_for_bit(quant_type):
    w = torch.randn(4, 64)
    _, state = bnb4.quantize_4bit(w, quant_type, 64)
    _, theirs = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert same_bits(state.tensors("w")["w.quant_map"], theirs.code)
