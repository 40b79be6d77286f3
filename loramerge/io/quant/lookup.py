"""Table lookups that do bitsandbytes' 4-bit searches in one or two gathers per value, bit for bit.

bitsandbytes picks the 4-bit code of a scaled value ``s`` (float32, in [-1, 1]) with ``bucketize``
on the 15 midpoints of the sorted code: the code's position is the count of midpoints below
``s``. A per-element binary search (or fifteen comparisons) costs ten times the rest of the
quantization on a CPU, so the code is read from a table instead.

:class:`NearestTable` is exact for every finite ``s``: it is keyed by the high 16 bits of ``s``
(its sign, exponent and 7 mantissa bits: 65 536 cells, each an interval of floats). Every value of
a cell has the same code, except in the 15 cells (at most one per midpoint) that hold a midpoint;
there the code is the lower one plus ``s > midpoint``, computed exactly as the sign of
``midpoint - s`` (a float difference is zero only for equal operands and otherwise has the sign of
the exact difference, subnormals included). So every finite ``s`` gets exactly the index
``bucketize`` gives, ties at a midpoint included: a tie goes to the lower code. Two gathers.

:class:`CoarseTable` needs one gather: it is keyed by ``fl(s + 6)``, whose 18 high mantissa bits
cut [-1, 1] into cells of 2⁻¹⁶ (``s + 6`` lies in [4, 8), one binade, so its bits are uniform
cells). A cell whose values, widened by more than the rounding of ``s + 6``, hold a midpoint maps
to a marker (4.0) instead of a code value; about 1 % of 64-value blocks of a weight contain one,
and those blocks are looked up again in the exact table.

Decoding packed codes is one gather per byte: :func:`pair_table` maps a byte to the float32 values
of its two nibbles (high nibble first) held as one int64.

They run on any device, but a GPU gains nothing from them: elsewhere than on the CPU the code is
picked by ``bucketize``, as bitsandbytes' reference kernel does it (:func:`nearest_positions`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

CELL_BITS = 16
CELLS = 1 << CELL_BITS
_SHIFT = 32 - CELL_BITS


@dataclass(frozen=True)
class NearestTable:
    """The position of the nearest code for every float32 cell (see the module docstring).

    ``threshold[cell]`` is the midpoint inside the cell, or +inf; ``positions[cell]`` the sorted
    position of the code of the cell's lowest value and ``positions[cell + CELLS]`` the one above
    it (the same where the cell holds no midpoint); ``values`` and ``codes`` map the same indices
    to the code's float32 value and its 4-bit code (uint8). ``bounds`` are the midpoints.
    """

    threshold: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor
    codes: torch.Tensor
    bounds: torch.Tensor


def build_table(bounds: torch.Tensor, sorted_values: torch.Tensor, sorted_codes: torch.Tensor) -> NearestTable:
    """The table for midpoints ``bounds`` (ascending float32) between codes of ``sorted_values``/``sorted_codes``.

    Raises ValueError where a cell would hold two midpoints (midpoints closer than a cell: not
    the case for NF4, FP4 or any 16-entry table with midpoints 2⁻¹⁰ apart near 1).

    Example:
        >>> t = build_table(torch.tensor([-0.5, 0.5]), torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0, 1, 2]))
        >>> lookup_values(torch.tensor([-0.5, -0.49, 0.5, 0.51]), t).tolist()
        [-1.0, 0.0, 0.0, 1.0]
    """
    bounds = bounds.float().cpu()
    cell = torch.arange(CELLS, dtype=torch.int64)
    low = _as_float(cell << _SHIFT)
    high = _as_float((cell << _SHIFT) | ((1 << _SHIFT) - 1))
    vmin, vmax = torch.minimum(low, high), torch.maximum(low, high)  # negative cells run downwards
    finite = torch.isfinite(vmin) & torch.isfinite(vmax)
    below = torch.bucketize(vmin, bounds).where(finite, 0)
    above = torch.bucketize(vmax, bounds).where(finite, 0)
    if bool((above - below > 1).any()):
        raise ValueError("two midpoints of the code fall in one table cell")
    split = above > below
    threshold = torch.full((CELLS,), float("inf"))
    threshold[split] = bounds[below[split]] + 0.0  # + 0.0: a -0.0 midpoint compares as +0.0 does
    positions = torch.cat([below, above]).to(torch.int32)
    return NearestTable(threshold, positions, sorted_values.float().cpu()[positions.long()],
                        sorted_codes.to(torch.uint8).cpu()[positions.long()], bounds)


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    """Float32 values of 32-bit patterns held in int64 (0 … 2³² − 1)."""
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


def table_on(table: NearestTable, device: torch.device) -> NearestTable:
    """``table`` with its tensors on ``device``."""
    if table.threshold.device == device:
        return table
    return NearestTable(*(t.to(device) for t in (table.threshold, table.positions, table.values, table.codes,
                                                 table.bounds)))


def table_index(scaled: torch.Tensor, table: NearestTable, out: torch.Tensor | None = None,
                gap: torch.Tensor | None = None) -> torch.Tensor:
    """The row of ``table.values``/``table.codes`` for each float32 of ``scaled`` (int32, flat); see the module docstring.

    ``out`` (int32) and ``gap`` (float32), as many elements as ``scaled``, are work buffers to
    reuse. Finite values only: a NaN or ±inf has no defined row.
    """
    flat = scaled.reshape(-1)
    bits = flat.view(torch.int32)
    index = torch.bitwise_right_shift(bits, _SHIFT, out=out if out is not None else torch.empty_like(bits))
    index.bitwise_and_(CELLS - 1)  # the arithmetic shift kept the sign: the cell is the low 16 bits
    gap = torch.index_select(table.threshold, 0, index, out=gap).sub_(flat)  # < 0 exactly where flat > midpoint
    return index.sub_(gap.view(torch.int32).bitwise_right_shift_(31), alpha=CELLS)


def lookup_values(scaled: torch.Tensor, table: NearestTable, out: torch.Tensor | None = None,
                  work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The float32 code value nearest to each finite float32 of ``scaled`` (flat), as bitsandbytes picks it.

    ``out`` receives the values; ``work`` is a pair of work buffers for :func:`table_index`.

    Example:
        >>> from loramerge.io.quant.bnb4 import nearest_table
        >>> lookup_values(torch.tensor([0.039, 0.04, 1.0]), nearest_table("nf4")).tolist()
        [0.0, 0.07958029955625534, 1.0]
    """
    return torch.index_select(table.values, 0, table_index(scaled, table, *(work or ())), out=out)


def lookup_codes(scaled: torch.Tensor, table: NearestTable) -> torch.Tensor:
    """The 4-bit code (uint8) nearest to each finite float32 of ``scaled`` (flat), as bitsandbytes picks it."""
    return torch.index_select(table.codes, 0, table_index(scaled, table))


COARSE_BITS = 18
COARSE_OFFSET = 6.0  # s + 6 lies in [4, 8) for every s in [-2, 2)
UNDECIDED = 4.0  # a coarse cell's marker: no code value is above 1
_COARSE_SHIFT = 23 - COARSE_BITS
_COARSE_MARGIN = 2.0**-20  # more than the rounding of s + 6 (half its ulp, 2⁻²²)


@dataclass(frozen=True)
class CoarseTable:
    """The code value of every cell of ``fl(s + 6)``, or :data:`UNDECIDED` (see the module docstring)."""

    values: torch.Tensor


def build_coarse(bounds: torch.Tensor, sorted_values: torch.Tensor) -> CoarseTable:
    """The coarse table for midpoints ``bounds`` (ascending float32) between the codes ``sorted_values``.

    Example:
        >>> t = build_coarse(torch.tensor([-0.5, 0.5]), torch.tensor([-1.0, 0.0, 1.0]))
        >>> coarse_values(torch.tensor([-0.75, -0.5, 0.2, 0.5000001]), t).tolist()
        [-1.0, 4.0, 0.0, 4.0]
    """
    width = 4.0 / (1 << COARSE_BITS)
    low = 4.0 + torch.arange(1 << COARSE_BITS, dtype=torch.float64) * width - COARSE_OFFSET  # each cell's s
    undecided = torch.zeros(low.shape, dtype=torch.bool)
    for bound in bounds.double().tolist():  # the cells whose values, widened by the margin, hold the midpoint
        undecided |= (low - _COARSE_MARGIN <= bound) & (bound < low + width + _COARSE_MARGIN)
    positions = torch.bucketize((low + width / 2).float(), bounds.float().cpu())
    values = sorted_values.float().cpu()[positions].where(~undecided, UNDECIDED)
    return CoarseTable(values)


def coarse_values(scaled: torch.Tensor, table: CoarseTable, out: torch.Tensor | None = None) -> torch.Tensor:
    """The code value of each float32 of ``scaled`` (flat, in [-2, 2)), or :data:`UNDECIDED`; ``scaled`` is overwritten.

    ``out`` (float32, as many elements) receives the values.
    """
    flat = scaled.reshape(-1).add_(COARSE_OFFSET)
    index = torch.bitwise_right_shift(flat.view(torch.int32), _COARSE_SHIFT, out=flat.view(torch.int32))
    index.bitwise_and_((1 << COARSE_BITS) - 1)  # the mantissa's high bits: the cell within [4, 8)
    return torch.index_select(table.values, 0, index, out=out)


def nearest_positions(scaled: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own search: the count of midpoints below each value (int64; any value, NaN included)."""
    return torch.bucketize(scaled, bounds.to(scaled.device))


def pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """Byte → the float32 values of its high and low nibble, packed in one int64 per byte (256 entries).

    Example:
        >>> pairs = pair_table(torch.arange(16, dtype=torch.float32))
        >>> pairs[0x3A:0x3B].view(torch.float32).tolist()
        [3.0, 10.0]
    """
    table = quant_map.float().reshape(-1)
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)
    if sys.byteorder != "little":  # keep memory order: (high, low) as two consecutive float32
        pairs = pairs.flip(1)
    return pairs.contiguous().view(torch.int64).reshape(-1)


def decode_bytes(raw: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 code values of packed bytes ``raw`` (uint8, flat): two per byte, high nibble first.

    ``pairs`` is :func:`pair_table` of the code's values (on ``raw``'s device); ``out`` (float32,
    ``2 · raw.numel()`` elements) receives the result.

    Example:
        >>> decode_bytes(torch.tensor([0x1F], dtype=torch.uint8), pair_table(torch.arange(16.0))).tolist()
        [1.0, 15.0]
    """
    index = raw.reshape(-1).to(torch.int32)
    target = None if out is None else out.view(torch.int64)
    return torch.index_select(pairs, 0, index, out=target).view(torch.float32)
