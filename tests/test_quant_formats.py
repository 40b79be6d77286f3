"""FP8 block, GPTQ and AWQ maths in :mod:`loramerge.io.quant` against transformers' FP8 code and float64 references."""

from __future__ import annotations

import pytest
import torch

from loramerge.io.quant import fp8, gptq

needs_fp8 = pytest.mark.skipif(fp8.FP8_DTYPE is None, reason="torch without float8_e4m3fn")


def _reference_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=torch.float64)
    for i in range(weight.shape[0]):
        for j in range(0, weight.shape[1], block[1]):
            out[i, j:j + block[1]] = weight[i, j:j + block[1]].double() * float(scale_inv[i // block[0], j // block[1]])
    return out


@needs_fp8
def test_fp8_dequantize_matches_float64_reference_with_partial_blocks():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 200, generator=g) * 100).to(fp8.FP8_DTYPE)
    scale_inv = torch.rand(3, 2, generator=g) + 0.01
    block = fp8.block_size_of((300, 200), (3, 2))
    assert block == (128, 128)
    ours = fp8.dequantize_fp8(weight, scale_inv, block)
    assert torch.equal(ours, _reference_fp8(weight, scale_inv, block).float())  # one correctly rounded product
    assert torch.equal(fp8.dequantize_fp8(weight[130:170], scale_inv, block, rows=(130, 170)), ours[130:170])


class _Config:
    weight_block_size = (128, 128)
    scale_fmt = "float"


class _Quantizer:
    quantization_config = _Config()


@needs_fp8
def test_fp8_quantize_matches_transformers_fp8_quantizer():
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 384, generator=g, dtype=torch.float32).to(torch.bfloat16)
    weight[:128, :128] = 0  # a zero block keeps scale 1
    theirs = finegrained.Fp8Quantize(_Quantizer())._quantize_one("m.weight", weight)
    q, scale_inv = fp8.quantize_fp8(weight)
    assert torch.equal(q.view(torch.uint8), theirs["m.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, theirs["m.weight_scale_inv"])
    dequantized = finegrained.Fp8Dequantize(_Quantizer())._dequantize_one(q, scale_inv, torch.float32)
    assert torch.equal(fp8.dequantize_fp8(q, scale_inv), dequantized)


def _codes(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, 16, shape, generator=g, dtype=torch.int64)


def _pack_gptq_rows(codes: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's loop: input channel 8r + j goes to bits 4j of row r (transcribed from QuantLinear.pack)."""
    packed = torch.zeros(codes.shape[0] // 8, codes.shape[1], dtype=torch.int64)
    for r in range(packed.shape[0]):
        for j in range(8):
            packed[r] |= codes[8 * r + j] << (4 * j)
    return packed.to(torch.int64).apply_(lambda v: v - (1 << 32) if v >= 1 << 31 else v).to(torch.int32)


def _pack_columns(codes: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for c in range(packed.shape[1]):
        for i in range(8):
            packed[:, c] |= codes[:, 8 * c + order[i]] << (4 * i)
    return packed.apply_(lambda v: v - (1 << 32) if v >= 1 << 31 else v).to(torch.int32)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_dequantize_matches_float64_reference(act_order, v2):
    g = torch.Generator().manual_seed(2)
    in_features, out_features, group_size = 64, 24, 16
    codes = _codes(g, in_features, out_features)
    zeros = _codes(g, in_features // group_size, out_features).clamp(1, 15)
    scales = (torch.rand(in_features // group_size, out_features, generator=g) + 0.1).half()
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=g)]
    stored_zeros = zeros if v2 else zeros - 1
    ours = gptq.dequantize_gptq(_pack_gptq_rows(codes), _pack_columns(stored_zeros), scales, g_idx.int(),
                                group_size=group_size, zero_offset=0 if v2 else 1)
    reference = torch.empty(out_features, in_features, dtype=torch.float64)
    for k in range(in_features):
        group = int(g_idx[k])
        reference[:, k] = scales[group].double() * (codes[k] - zeros[group]).double()
    assert torch.equal(ours.double(), reference)


def test_awq_dequantize_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    in_features, out_features, group_size = 64, 32, 16
    codes = _codes(g, in_features, out_features)
    zeros = _codes(g, in_features // group_size, out_features)
    scales = (torch.rand(in_features // group_size, out_features, generator=g) + 0.1).half()
    # AutoAWQ's WQLinear_GEMM.from_linear loop: bits 4i of word c hold output channel 8c + order[i]
    ours = gptq.dequantize_awq(_pack_columns(codes, gptq.AWQ_ORDER), _pack_columns(zeros, gptq.AWQ_ORDER), scales,
                               group_size=group_size)
    groups = torch.arange(in_features) // group_size
    reference = (scales[groups].double() * (codes - zeros[groups]).double()).T
    assert torch.equal(ours.double(), reference)
