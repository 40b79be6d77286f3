"""bitsandbytes 4-bit and 8-bit maths in :mod:`loramerge.io.quant` against bitsandbytes itself (CPU backend)."""

from __future__ import annotations

import pytest
import torch

from loramerge.io.quant import bnb4, int8

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(64, 96), (33, 17), (5, 64 * 3 + 7)]  # whole blocks; odd count with a tail block; tail within a row


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1
    w.view(-1)[:64] = 0.0  # an all-zero block
    w.view(-1)[70] = 3.0  # an outlier
    return w.to(dtype)


def _reference_blockwise(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' reference ``quantize_blockwise`` kernel (the one its CUDA kernel mirrors), not the CPU LUT one."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, values, code, blocksize)


def test_code_tables_match_bitsandbytes():
    for quant_type in bnb4.QUANT_TYPES:
        assert torch.equal(bnb4.code_table(quant_type), bnb_functional.get_4bit_type(quant_type, device="cpu"))
    assert torch.equal(bnb4.dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_4bit_is_bit_identical(dtype, quant_type, blocksize):
    for shape in SHAPES:
        w = _weight(shape, dtype)
        ours, state = bnb4.quantize_4bit(w, quant_type, blocksize)
        theirs, their_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(ours, theirs), (shape, dtype)
        assert torch.equal(state.absmax, their_state.absmax)
        assert torch.equal(bnb4.dequantize_4bit(ours, state), bnb_functional.dequantize_4bit(theirs, their_state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_double_quant_matches_bitsandbytes_reference_kernel(dtype, quant_type):
    w = _weight((256, 160), dtype, seed=1)  # 640 absmax values: two full nested blocks and a tail
    packed, state = bnb4.quantize_4bit(w, quant_type, 64, double_quant=True)
    theirs, their_state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, theirs)  # codes are chosen with the exact absmax
    assert state.nested is not None
    assert state.nested.offset == their_state.offset.item()
    absmax = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)[1].absmax
    codes, scales = _reference_blockwise(absmax - their_state.offset, bnb_functional.create_dynamic_map(), 256)
    assert torch.equal(state.nested.codes, codes)
    assert torch.equal(state.nested.scales, scales)
    assert torch.equal(state.nested.scales, their_state.state2.absmax)
    # bitsandbytes' CPU kernel picks codes from a lookup table; where it agrees, the restored scales agree bit for bit
    same = their_state.absmax == state.absmax
    assert same.float().mean() > 0.5
    their_scales = bnb_functional.dequantize_blockwise(their_state.absmax, their_state.state2) + their_state.offset
    assert torch.equal(state.scales()[same], their_scales[same])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_dequantize_4bit_is_bit_identical_for_bitsandbytes_states(dtype, quant_type):
    for double in (False, True):
        w = _weight((96, 80), dtype, seed=2)
        packed, their_state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                           compress_statistics=double)
        tensors = {f"w.{k}": v for k, v in their_state.as_dict(packed=True).items()}
        state = bnb4.state_from_tensors(tensors, "w")
        assert (state.nested is not None) == double
        assert torch.equal(bnb4.dequantize_4bit(packed, state), bnb_functional.dequantize_4bit(packed, their_state))


def test_serialized_state_round_trips_through_bitsandbytes():
    w = _weight((64, 64), torch.bfloat16)
    packed, state = bnb4.quantize_4bit(w, "nf4", 64, double_quant=True)
    their_state = bnb_functional.QuantState.from_dict(state.tensors("w"), device=torch.device("cpu"))
    assert their_state.nested and their_state.quant_type == "nf4" and their_state.dtype == torch.bfloat16
    assert torch.equal(bnb_functional.dequantize_4bit(packed, their_state), bnb4.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_dequantize_matches_bitsandbytes(dtype):
    w = _weight((48, 40), dtype)
    codes, scb, _ = bnb_functional.int8_vectorwise_quant(w)
    assert torch.equal(int8.dequantize_int8(codes, scb), bnb_functional.int8_vectorwise_dequant(codes, scb))
    ours_codes, ours_scb = int8.quantize_int8(w)
    assert torch.equal(ours_codes, codes) and torch.equal(ours_scb, scb)
