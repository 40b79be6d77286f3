"""bitsandbytes 4-bit maths on a slice of a weight: what a fold streams, row block by row block.

- :func:`fake_quantize_range`: ``dequant(quant(W))`` of some flat elements of a weight, in its dtype
  (the weights a QLoRA adapter was trained against);
- :func:`dequantize_range`: the weight of some elements of a packed 4-bit checkpoint, in its dtype.

Each gives, slice by slice, exactly what :mod:`~loramerge.io.quant.bnb4` gives for the whole weight.
A slice of whole quantization blocks (the fold's case whenever a row holds whole blocks) takes the
fast path: broadcast multiplies by the block scales and one table lookup per value (see
:mod:`~loramerge.io.quant.lookup`), into reused work buffers, and the float32 result is rounded
to the weight's dtype as it is stored. Any other slice maps every element to its block.
"""

from __future__ import annotations

import threading

import torch

from loramerge.io.quant import bnb4, lookup


class Workspace:
    """Work buffers reused from one row block to the next (per thread, per device and role).

    A fresh multi-megabyte tensor per block would come from mmap and page-fault on first touch,
    which costs as much as the arithmetic done in it.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[int, str, torch.device], torch.Tensor] = {}

    def get(self, role: str, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of ``count`` elements of ``dtype`` (its contents are stale)."""
        key = (threading.get_ident(), role, device)
        held = self._held.get(key)
        needed = count * dtype.itemsize
        if held is None or held.numel() < needed:
            held = self._held[key] = torch.empty(max(needed, 1), dtype=torch.uint8, device=device)
        return held[:needed].view(dtype)


def _whole_blocks(first: int, count: int, total: int, blocksize: int) -> bool:
    """Whether elements ``first … first + count`` of a weight of ``total`` are whole, full blocks."""
    return first % blocksize == 0 and count % blocksize == 0 and first + count <= total - total % blocksize


def fake_quantize_range(values: torch.Tensor, first: int, total: int, quant_type: str, blocksize: int,
                        absmax: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                        workspace: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant(quant(W))`` of ``values``, the flat elements ``first …`` of a weight ``W`` of ``total`` elements.

    ``values`` are in the weight's dtype (the result's). ``absmax`` is the float32 absmax of every
    block of the whole weight, needed unless the slice is whole blocks (then it is computed from
    ``values``); ``scales`` is what dequantization multiplies by (the double-quantized absmax),
    by default the absmax. The result is flat, in ``out`` when given (of the weight's dtype, as
    many elements).

    Example:
        >>> w = torch.randn(4, 96, dtype=torch.bfloat16)
        >>> whole = bnb4.fake_quantize_4bit(w, "nf4", 64).reshape(-1)
        >>> part = fake_quantize_range(w.reshape(-1)[128:256], 128, w.numel(), "nf4", 64)
        >>> bool(torch.equal(part, whole[128:256]))
        True
    """
    flat = values.reshape(-1)
    count, device = flat.numel(), flat.device
    if not _whole_blocks(first, count, total, blocksize):
        if absmax is None:
            raise ValueError("a slice of partial blocks needs the absmax of the whole weight")
        codes = codes_in_range(flat, first, absmax, total, quant_type, blocksize)
        code_values = bnb4.code_table(quant_type).to(device)[codes.long()]
        result = scale_range(code_values, first, absmax if scales is None else scales, blocksize)
        return result.to(flat.dtype) if out is None else out.copy_(result)
    workspace = workspace or Workspace()
    blocks = flat.view(-1, blocksize)
    b0, b1 = first // blocksize, (first + count) // blocksize
    block_absmax = bnb4.rows_absmax(blocks) if absmax is None else absmax[b0:b1].to(device)
    block_scales = block_absmax if scales is None else scales[b0:b1].to(device)
    reciprocal = (1.0 / block_absmax.clamp(min=bnb4.TINY)).unsqueeze(1)
    scaled = workspace.get("scaled", count, torch.float32, device).view(blocks.shape)
    scaled.copy_(blocks).mul_(reciprocal)  # (a mixed-dtype multiply would convert into a new temporary)
    code_values = workspace.get("values", count, torch.float32, device)
    if bnb4.all_finite(block_absmax):
        _table_values(blocks, reciprocal, scaled, quant_type, code_values)
    else:  # an inf or NaN in the weight: bitsandbytes' own search, whatever it makes of them
        bnb4.nearest_values(scaled, quant_type, finite=False, out=code_values)
    code_values.view(blocks.shape).mul_(block_scales.float().unsqueeze(1))
    if out is None:
        return code_values.to(flat.dtype, copy=True)
    return out.copy_(code_values)


def _table_values(blocks: torch.Tensor, reciprocal: torch.Tensor, scaled: torch.Tensor, quant_type: str,
                  out: torch.Tensor) -> None:
    """Code values of ``scaled`` (``blocks`` × ``reciprocal``, finite) into ``out``: one gather, then the few
    blocks where the coarse table is undecided again, in the exact table. ``scaled`` is overwritten."""
    values = lookup.coarse_values(scaled, bnb4.coarse_table(quant_type), out=out).view(blocks.shape)
    undecided = (values.amax(dim=1) > 2.0).nonzero().squeeze(1)
    if undecided.numel():
        exact = torch.index_select(blocks, 0, undecided).float().mul_(reciprocal.index_select(0, undecided))
        values.index_copy_(0, undecided, lookup.lookup_values(exact, bnb4.nearest_table(quant_type)).view(exact.shape))


def dequantize_range(raw: torch.Tensor, first: int, count: int, scales: torch.Tensor, pairs: torch.Tensor,
                     blocksize: int, dtype: torch.dtype, workspace: Workspace | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements ``first … first + count`` of a packed 4-bit weight, in ``dtype`` (flat; in ``out`` when given).

    ``raw`` holds the packed bytes from byte ``first // 2`` on (uint8); ``scales`` is the float32
    scale of every block of the weight (the restored absmax); ``pairs`` is
    :func:`~loramerge.io.quant.lookup.pair_table` of the weight's ``quant_map``, on ``raw``'s device.

    Example:
        >>> w = torch.randn(3, 64, dtype=torch.float16)
        >>> packed, state = bnb4.quantize_4bit(w, "fp4", 64)
        >>> pairs = lookup.pair_table(state.quant_map)
        >>> rows = dequantize_range(packed.reshape(-1)[32:], 64, 128, state.absmax, pairs, 64, torch.float16)
        >>> bool(torch.equal(rows, bnb4.dequantize_4bit(packed, state).reshape(-1)[64:]))
        True
    """
    skip = first % 2
    raw = raw.reshape(-1)[: (skip + count + 1) // 2]
    workspace = workspace or Workspace()
    decoded = workspace.get("values", 2 * raw.numel(), torch.float32, raw.device)
    code_values = lookup.decode_bytes(raw, pairs, out=decoded)[skip:skip + count]
    if first % blocksize or count % blocksize:
        result = scale_range(code_values, first, scales, blocksize)
        return result.to(dtype) if out is None else out.copy_(result)
    b0 = first // blocksize
    block_scales = scales[b0:b0 + count // blocksize].to(raw.device).float().unsqueeze(1)
    code_values.view(-1, blocksize).mul_(block_scales)  # (into the work buffer: no mixed-dtype temporary)
    if out is None:
        return code_values.to(dtype, copy=True)
    return out.copy_(code_values)


def codes_in_range(values: torch.Tensor, first: int, absmax: torch.Tensor, total: int, quant_type: str,
                   blocksize: int) -> torch.Tensor:
    """The 4-bit codes (uint8) of ``values``, the flat elements ``first …`` of a weight of ``total`` elements.

    Gives, slice by slice, exactly what :func:`~loramerge.io.quant.bnb4.quantize_codes` gives for
    the whole weight: each value scaled by its block's reciprocal absmax (a trailing partial
    block: divided by it), clamped and bucketed.

    Example:
        >>> w = torch.randn(300)
        >>> absmax = bnb4.block_absmax(w, 64)
        >>> whole = bnb4.quantize_codes(w, absmax, "nf4", 64)
        >>> bool(torch.equal(codes_in_range(w[100:250], 100, absmax, 300, "nf4", 64), whole[100:250]))
        True
    """
    flat = values.reshape(-1).float()
    count, full_blocks = flat.numel(), total // blocksize
    absmax = absmax.to(flat.device)
    if _whole_blocks(first, count, total, blocksize):
        b0 = first // blocksize
        used = absmax[b0:b0 + count // blocksize]
        scaled = (flat.view(-1, blocksize) * (1.0 / used.clamp(min=bnb4.TINY)).unsqueeze(1)).view(-1)
    else:
        index = torch.arange(first, first + count, device=flat.device) // blocksize
        used = absmax[first // blocksize:(first + count - 1) // blocksize + 1]
        reciprocal = 1.0 / absmax[:full_blocks].clamp(min=bnb4.TINY)
        if full_blocks < absmax.numel():
            reciprocal = torch.cat([reciprocal, reciprocal.new_ones(1)])
        scaled = flat * reciprocal[index]
        tail = index >= full_blocks
        if bool(tail.any()):
            scaled[tail] = flat[tail] / absmax[full_blocks]
    return bnb4.nearest_codes(scaled.clamp_(-1, 1), quant_type, finite=bnb4.all_finite(used))


def scale_range(values: torch.Tensor, first: int, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Float32 ``values`` (flat elements ``first …``) times their block's scale (bit for bit ``scale_blocks``)."""
    scales = scales.float().to(values.device)
    if first % blocksize == 0 and values.numel() % blocksize == 0:
        b0 = first // blocksize
        return (values.view(-1, blocksize) * scales[b0:b0 + values.numel() // blocksize].unsqueeze(1)).view(-1)
    index = torch.arange(first, first + values.numel(), device=values.device) // blocksize
    return values * scales[index]
