"""bitsandbytes 4-bit quantization (NF4 and FP4), in plain torch, bit for bit as bitsandbytes does it.

A weight is flattened row-major and cut into blocks of ``blocksize`` values (64 by default). Each
block is scaled by its absolute maximum (``absmax``, float32) into [-1, 1] and every value is
replaced by the index of the nearest entry of a 16-value code table: NF4 (quantiles of a normal
distribution, QLoRA) or FP4 (1 sign, 2 exponent, 1 mantissa bit). Two 4-bit indices are packed per
byte, the first in the high nibble. Dequantization is ``code[index] * absmax`` in float32, rounded
once to the weight's dtype.

Double quantization (``compress_statistics``, QLoRA's "double quant") stores the absmax values
themselves in 8 bits: their mean is subtracted (the ``offset``), the rest is quantized blockwise
(blocks of 256) with bitsandbytes' signed 8-bit dynamic map, and dequantization adds the offset
back. The codes of the weight are always chosen with the exact float32 absmax; only the scale that
dequantization multiplies by is the double-quantized one.

This module follows bitsandbytes' reference kernels (``backends/default/ops.py``, which mirror its
CUDA kernels): reciprocal scaling, ``clamp`` to [-1, 1] and ``bucketize`` on the midpoints of the
sorted code, a trailing partial block scaled by division, ``1e-38`` as the floor of a zero block's
scale. bitsandbytes' native CPU kernel for the 8-bit step (``quantize_blockwise``) uses a
65 536-entry lookup table instead, which picks a neighbouring code for some values; CUDA and the
reference kernel agree with this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from loramerge.io.quant import lookup
from loramerge.io.structured import INT, NUMBER, POSITIVE_INT, STRING, list_of, parse_json

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
TINY = 1e-38  # bitsandbytes' floor for the scale of an all-zero block

# The code tables as bitsandbytes defines them (``get_4bit_type``): NF4 values are normal-distribution
# quantiles; FP4 entries are listed in bit-pattern order and divided by their largest magnitude, 12.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_FP4_PATTERNS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@cache
def code_table(quant_type: str) -> torch.Tensor:
    """The 16 dequantized values of ``quant_type`` (``nf4``/``fp4``), indexed by the 4-bit code, float32.

    These are the values bitsandbytes' dequantization kernels (CUDA, and the native CPU one) give:
    FP4's code 8 is -0.0. The table bitsandbytes stores as ``quant_map`` has +0.0 there
    (:func:`stored_map`), and its Python reference kernel, which looks values up in that table,
    gives +0.0.

    Example:
        >>> code_table("nf4")[7].item(), code_table("fp4")[3].item(), code_table("fp4")[8].item()
        (0.0, 1.0, -0.0)
    """
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        table = torch.tensor(_FP4_PATTERNS, dtype=torch.float32)
        return table / table.abs().max()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def stored_map(quant_type: str) -> torch.Tensor:
    """The ``quant_map`` bitsandbytes serializes (``get_4bit_type``): :func:`code_table` with +0.0 for -0.0.

    Example:
        >>> stored_map("fp4")[8].item()
        0.0
    """
    return code_table(quant_type) + 0.0


def kernel_map(quant_map: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The values a stored ``quant_map`` dequantizes to: :func:`code_table` where the map holds its values (the
    kernels use their built-in table), else the map itself (float32).

    Example:
        >>> kernel_map(stored_map("fp4"), "fp4")[8].item()
        -0.0
    """
    table = code_table(quant_type) if quant_type in QUANT_TYPES else None
    if table is not None and quant_map.numel() == 16 and torch.equal(quant_map.float().cpu(), table):
        return table.to(quant_map.device)
    return quant_map.float()


@cache
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between consecutive sorted code values, and the code index of each sorted value."""
    code = code_table(quant_type)
    order = torch.argsort(code, stable=True)  # FP4's +0 sorts before its -0, as in bitsandbytes
    return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.uint8)


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (``create_dynamic_map()``): 256 sorted float32 values.

    Each exponent 10⁻⁶ … 10⁰ gets 2ⁱ fractions (the midpoints of ``linspace(0.1, 1, 2ⁱ + 1)``), with
    both signs; 0 and 1 complete it (Dettmers, "8-Bit Approximations for Parallelism in Deep
    Learning", 2016).

    Example:
        >>> m = dynamic_map()
        >>> m.numel(), m[-1].item(), round(m[0].item(), 6)
        (256, 1.0, -0.992969)
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The float32 absmax of each block of ``flat`` (1-D); a trailing partial block's is floored at 1e-38.

    Example:
        >>> block_absmax(torch.tensor([1.0, -3.0, 2.0]), 2).tolist()
        [3.0, 2.0]
    """
    flat = flat.reshape(-1)
    full = flat.numel() - flat.numel() % blocksize
    absmax = rows_absmax(flat[:full].reshape(-1, blocksize))
    if full < flat.numel():
        tail = flat[full:].float().abs().amax().clamp(min=TINY)
        absmax = torch.cat([absmax, tail.reshape(1)])
    return absmax


# Floats of these dtypes order like their bit patterns once the sign bit is cleared (NaN above inf).
_MAGNITUDE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
                   torch.float32: (torch.int32, 0x7FFFFFFF)}


def rows_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks.float().abs().amax(dim=1)`` of a 2-D float tensor, as a max over integer magnitudes: one pass.

    Exact: clearing the sign bit gives |x|, and non-negative floats order like their bits (a NaN
    anywhere gives a NaN).

    Example:
        >>> rows_absmax(torch.tensor([[1.0, -3.0], [-0.0, 0.5]], dtype=torch.bfloat16)).tolist()
        [3.0, 0.5]
    """
    kind = _MAGNITUDE_BITS.get(blocks.dtype)
    if kind is None or blocks.numel() == 0 or blocks.stride(-1) != 1:
        return blocks.float().abs().amax(dim=1)
    ints, mask = kind
    return torch.bitwise_and(blocks.view(ints), mask).amax(dim=1).view(blocks.dtype).float()


def _scaled(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` divided by its block's absmax and clamped to [-1, 1], as the reference kernel computes it."""
    flat = flat.reshape(-1).float()
    full = flat.numel() - flat.numel() % blocksize
    blocks = full // blocksize
    scaled = (flat[:full].reshape(blocks, blocksize) * (1.0 / absmax[:blocks].clamp(min=TINY)).unsqueeze(1))
    scaled = scaled.clamp_(-1, 1).reshape(-1)
    if full < flat.numel():
        scaled = torch.cat([scaled, (flat[full:] / absmax[blocks]).clamp_(-1, 1)])
    return scaled


def quantize_codes(flat: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """The unpacked 4-bit code (uint8, 0…15) of every value of ``flat`` given its blocks' float32 ``absmax``.

    Example:
        >>> quantize_codes(torch.tensor([1.0, -1.0, 0.0, 0.5]), torch.tensor([1.0, 1.0]), "nf4", 2).tolist()
        [15, 0, 7, 12]
    """
    return nearest_codes(_scaled(flat, absmax, blocksize), quant_type, finite=all_finite(absmax))


@cache
def nearest_table(quant_type: str) -> lookup.NearestTable:
    """The cell table of ``quant_type`` (see :mod:`loramerge.io.quant.lookup`), on the CPU.

    Example:
        >>> int(torch.isfinite(nearest_table("nf4").threshold).sum())  # one cell per midpoint
        15
    """
    bounds, order = _bounds(quant_type)
    return lookup.build_table(bounds, code_table(quant_type)[order.long()], order)


@cache
def coarse_table(quant_type: str) -> lookup.CoarseTable:
    """The one-gather table of ``quant_type`` (see :mod:`loramerge.io.quant.lookup`), on the CPU.

    Example:
        >>> int((coarse_table("nf4").values == 4.0).sum()) < 64  # a few cells per midpoint are undecided
        True
    """
    bounds, order = _bounds(quant_type)
    return lookup.build_coarse(bounds, code_table(quant_type)[order.long()])


def all_finite(absmax: torch.Tensor) -> bool:
    """Whether the table lookups apply: on the CPU, every block's absmax (hence every scaled value) finite."""
    return absmax.device.type == "cpu" and bool(torch.isfinite(absmax).all())


def nearest_codes(scaled: torch.Tensor, quant_type: str, finite: bool) -> torch.Tensor:
    """bitsandbytes' 4-bit code (uint8) of each scaled value: ``bucketize`` on the midpoints, mapped to the code.

    ``finite`` says every value is finite and on the CPU, where a table lookup gives the same codes
    (:mod:`~loramerge.io.quant.lookup`); otherwise bitsandbytes' own ``bucketize`` runs.

    Example:
        >>> nearest_codes(torch.tensor([-1.0, 0.0, 0.5, 2.0]), "fp4", finite=True).tolist()
        [11, 0, 5, 3]
    """
    flat = scaled.reshape(-1)
    if finite:
        return lookup.lookup_codes(flat, nearest_table(quant_type))
    bounds, order = _bounds(quant_type)
    return order.to(flat.device)[lookup.nearest_positions(flat, bounds)]


def nearest_values(scaled: torch.Tensor, quant_type: str, finite: bool, out: torch.Tensor | None = None,
                   work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The float32 code value bitsandbytes' quantization picks for each scaled value (flat); see :func:`nearest_codes`.

    ``out`` receives the values; ``work`` is a pair of work buffers (int32 and float32, as many
    elements as ``scaled``) for the table lookup.

    Example:
        >>> midpoint = 0.03979014977812767  # between the codes 0.0 and 0.0796: a tie goes to the lower one
        >>> nearest_values(torch.tensor([0.5, midpoint, 0.0398]), "nf4", finite=True).tolist()
        [0.44070982933044434, 0.0, 0.07958029955625534]
    """
    flat = scaled.reshape(-1)
    if finite:
        return lookup.lookup_values(flat, nearest_table(quant_type), out=out, work=work)
    bounds, order = _bounds(quant_type)
    sorted_values = code_table(quant_type)[order.long()].to(flat.device)
    result = sorted_values[lookup.nearest_positions(flat, bounds)]
    return out.copy_(result) if out is not None else result


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble; the count must be even.

    Example:
        >>> pack(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist()
        [18, 240]
    """
    codes = codes.reshape(-1).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` 4-bit codes of ``packed`` (any dtype, read as bytes), as int64 indices.

    Example:
        >>> unpack(torch.tensor([18, 240], dtype=torch.uint8), 3).tolist()
        [1, 2, 15]
    """
    data = packed.reshape(-1).contiguous().view(torch.uint8)
    codes = torch.empty(2 * data.numel(), dtype=torch.uint8, device=data.device)
    codes[0::2] = data >> 4
    codes[1::2] = data & 0xF
    return codes[:count].long()


def byte_values(raw: torch.Tensor, quant_map: torch.Tensor) -> torch.Tensor:
    """Float32 code values of packed bytes ``raw``: two per byte, high nibble first (one gather per byte).

    Example:
        >>> byte_values(torch.tensor([0xF0], dtype=torch.uint8), code_table("nf4")).tolist()
        [1.0, -1.0]
    """
    raw = raw.reshape(-1).contiguous().view(torch.uint8)
    return lookup.decode_bytes(raw, lookup.pair_table(quant_map.to(raw.device)))


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values`` (float32, flat) times their block's absmax, in float32, as bitsandbytes' dequantization does."""
    n = values.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].reshape(blocks, blocksize) * absmax[:blocks].float().unsqueeze(1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[blocks].float()
    return out


@dataclass
class NestedAbsmax:
    """Double-quantized absmax values: 8-bit ``codes``, their float32 ``scales`` per 256 values, and the ``offset``."""

    codes: torch.Tensor
    scales: torch.Tensor
    offset: float
    quant_map: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE

    def dequantize(self) -> torch.Tensor:
        """The absmax values dequantization multiplies by: ``quant_map[codes] * scale + offset``, float32."""
        values = self.quant_map.float().to(self.codes.device)[self.codes.reshape(-1).to(torch.int64)]
        restored = scale_blocks(values, self.scales, self.blocksize)
        return restored + torch.tensor(self.offset, dtype=torch.float32)


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                            quant_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of float32 ``values`` with the dynamic map: ``(codes uint8, absmax float32)``.

    Example:
        >>> codes, scales = quantize_blockwise_8bit(torch.tensor([0.5, -1.0, 0.25]), 2)
        >>> [round(v, 4) for v in dynamic_map()[codes.long()].tolist()], scales.tolist()
        ([0.5008, -0.993, 1.0], [1.0, 0.25])
    """
    code = dynamic_map() if quant_map is None else quant_map.float()
    flat = values.reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    scaled = _scaled(flat, absmax, blocksize)
    bounds = ((code[:-1] + code[1:]) / 2).to(flat.device)
    return torch.bucketize(scaled, bounds).to(torch.uint8), absmax


def double_quantize(absmax: torch.Tensor) -> NestedAbsmax:
    """Double quantization of 4-bit absmax values, as ``quantize_4bit(compress_statistics=True)`` does it.

    Example:
        >>> nested = double_quantize(torch.tensor([1.0, 2.0, 3.0]))
        >>> nested.offset, [round(v, 3) for v in nested.dequantize().tolist()]
        (2.0, [1.007, 2.0, 3.0])
    """
    absmax = absmax.float()
    offset = absmax.mean()
    codes, scales = quantize_blockwise_8bit(absmax - offset)
    return NestedAbsmax(codes, scales, float(offset.item()), dynamic_map().clone())


@dataclass
class QuantState4bit:
    """Everything needed to dequantize one bitsandbytes 4-bit weight (bitsandbytes' ``QuantState``).

    ``absmax`` is the float32 scale per block, or, when ``nested`` is set, the uint8 codes of the
    double-quantized scales. ``dtype`` and ``shape`` are the original weight's.
    """

    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested: NestedAbsmax | None = None

    def scales(self) -> torch.Tensor:
        """The float32 absmax that dequantization multiplies by (double-quantized ones restored)."""
        return self.nested.dequantize() if self.nested is not None else self.absmax.float()

    def packed_metadata(self) -> dict[str, Any]:
        """The non-tensor fields bitsandbytes serializes under ``quant_state.bitsandbytes__<type>``."""
        fields: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.nested is not None:
            fields.update({"nested_blocksize": self.nested.blocksize, "nested_dtype": "float32",
                           "nested_offset": self.nested.offset})
        return fields

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state's tensors under transformers' checkpoint names (``<prefix>.absmax``, ...), weight excluded."""
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map.float()}
        if self.nested is not None:
            out[f"{prefix}.nested_absmax"] = self.nested.scales
            out[f"{prefix}.nested_quant_map"] = self.nested.quant_map.float()
        text = json.dumps(self.packed_metadata()).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(text), dtype=torch.uint8)
        return out


def check_settings(quant_type: str, blocksize: int) -> None:
    """Refuse a quant type or block size bitsandbytes does not support (ValueError)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"4-bit quant type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"4-bit block size must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> tuple[torch.Tensor, QuantState4bit]:
    """``bitsandbytes.functional.quantize_4bit``: the packed codes ``(⌈n/2⌉, 1)`` uint8 and the quant state.

    Example:
        >>> w = torch.tensor([[0.5, -1.0], [0.25, 2.0]])
        >>> packed, state = quantize_4bit(w, "nf4", 64)
        >>> packed.shape, state.absmax.tolist(), dequantize_4bit(packed, state).mul(1000).round().tolist()
        (torch.Size([2, 1]), [2.0], [[492.0, -1050.0], [322.0, 2000.0]])
    """
    check_settings(quant_type, blocksize)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 weights, got {weight.dtype}")
    flat = weight.reshape(-1)
    absmax = block_absmax(flat, blocksize)
    codes = quantize_codes(flat, absmax, quant_type, blocksize)
    if codes.numel() % 2:
        codes = torch.cat([codes, quantize_codes(torch.zeros(1), torch.ones(1), quant_type, 1).to(codes.device)])
    packed = pack(codes).unsqueeze(1)
    nested = double_quantize(absmax) if double_quant else None
    state = QuantState4bit(quant_type, blocksize, weight.dtype, tuple(weight.shape),
                           nested.codes if nested is not None else absmax, stored_map(quant_type), nested)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit``: ``code[index] · absmax`` in float32, cast to the weight's dtype.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.bfloat16)
        >>> dequantize_4bit(*quantize_4bit(w, "fp4", 32)).tolist()
        [[1.0, 0.0, -1.0]]
    """
    values = byte_values(packed, kernel_map(state.quant_map, state.quant_type))[:math.prod(state.shape)]
    return scale_blocks(values, state.scales(), state.blocksize).reshape(state.shape).to(dtype or state.dtype)


def fake_quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = False) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(weight))`` in the weight's dtype: the weights a QLoRA adapter was trained against.

    Example:
        >>> w = torch.randn(8, 16, dtype=torch.bfloat16)
        >>> q = fake_quantize_4bit(w, "nf4")
        >>> q.dtype, bool(torch.equal(fake_quantize_4bit(q, "nf4"), q))
        (torch.bfloat16, True)
    """
    return dequantize_4bit(*quantize_4bit(weight, quant_type, blocksize, double_quant))


def state_from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> QuantState4bit:
    """The quant state of ``<prefix>`` from transformers' serialized keys (``<prefix>.absmax``, ``.quant_map``, ...).

    Raises KeyError for a missing tensor and ValueError for a malformed packed state.
    """
    packed_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(packed_keys) != 1:
        raise ValueError(f"expected one {prefix}.quant_state.bitsandbytes__<type> tensor, found {len(packed_keys)}")
    try:
        text = bytes(tensors[packed_keys[0]].to(torch.uint8).tolist()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{packed_keys[0]} does not hold bitsandbytes' JSON quant state ({exc})") from None
    # Bounded parse and field types (a CorruptFile is a ValueError): int() of a list never runs.
    fields = parse_json(text, name=f"{packed_keys[0]} (bitsandbytes quant state)", schema=_STATE_SCHEMA)
    quant_type = str(fields.get("quant_type"))
    blocksize = int(fields.get("blocksize", 64))
    check_settings(quant_type, blocksize)
    dtype = getattr(torch, str(fields.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{packed_keys[0]}: unknown dtype {fields.get('dtype')!r}")
    nested = None
    if "nested_absmax" in fields or f"{prefix}.nested_absmax" in tensors:
        nested = NestedAbsmax(tensors[f"{prefix}.absmax"], tensors[f"{prefix}.nested_absmax"].float(),
                              float(fields["nested_offset"]), tensors[f"{prefix}.nested_quant_map"].float(),
                              int(fields.get("nested_blocksize", NESTED_BLOCKSIZE)))
    return QuantState4bit(quant_type, blocksize, dtype, tuple(int(d) for d in fields["shape"]),
                          tensors[f"{prefix}.absmax"], tensors[f"{prefix}.quant_map"].float(), nested)


_STATE_SCHEMA = {"quant_type": STRING, "blocksize": POSITIVE_INT, "dtype": STRING, "shape": list_of(INT),
                 "nested_offset": NUMBER, "nested_blocksize": POSITIVE_INT}

STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                  "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
