"""Sparsifiers of the per-entry merges: which entries of one task update survive, and their rescale.

Each function takes one dense ``(out, in·k)`` update and returns a tensor of the same shape; with
``inplace=True`` it overwrites and returns its input, which saves one m×n buffer per source.
"Rows" are rows of that matrix (one output unit's incoming weights). Random draws come from a CPU
``torch.Generator`` and are then moved to the update's device, so a seed gives the same mask on
every device. Large updates are processed in blocks of rows of a fixed size, which bounds the
temporaries and keeps the draws independent of the device as well.

- :func:`magnitude` — TIES trim (Yadav et al. 2023): keep the ⌊d·N⌋ largest \\|entries\\| of the tensor.
- :func:`random_drop` — DARE (Yu et al. 2024): keep each entry with probability d, rescale by 1/d.
- :func:`outliers` — Model Breadcrumbs (Davari & Belilovsky 2024): per row, drop the top γ and keep
  the next d by magnitude.
- :func:`magprune` — DELLA's MAGPRUNE (Deep et al. 2024): per row, keep probability rising linearly
  with the magnitude rank from d − ε to d + ε, survivors rescaled by 1/p.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# Above this many entries an exact k-th value is found by sampling a bracket first (see kth_largest).
_DIRECT_SELECT = 1 << 16
# Rows per block for the row-wise sparsifiers: about this many entries per block.
_BLOCK_ENTRIES = 1 << 22


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest entry of ``values`` (any shape), as a 0-d tensor.

    ``torch.kthvalue`` on tens of millions of entries takes seconds on a CPU. For large inputs a
    random sample brackets the answer, one counting pass checks the bracket, and the selection
    runs only on the few entries inside it; a bracket that misses falls back to the full selection,
    so the result is always exact.

    Example:
        >>> kth_largest(torch.tensor([3.0, -1.0, 7.0, 5.0]), 2).item()
        5.0
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= _DIRECT_SELECT:
        return torch.kthvalue(flat, n - k + 1).values
    # A random (fixed-seed) sample: a strided one can line up with the rows of a low-rank matrix.
    size = min(1 << 18, max(1 << 12, n // 32))
    picks = torch.randint(n, (size,), generator=torch.Generator().manual_seed(0)).to(flat.device)
    sample = flat[picks]
    s = sample.numel()
    expected = k * s / n
    margin = 6.0 * math.sqrt(expected * (1.0 - k / n)) + 16.0
    hi_rank, lo_rank = math.floor(expected - margin), math.ceil(expected + margin)
    # Two selections on the sample, not a sort of it (a sort of a few thousand values costs more
    # than a pass over the full tensor).
    hi = (torch.kthvalue(sample, s - hi_rank + 1).values if hi_rank >= 1
          else torch.tensor(math.inf, dtype=flat.dtype, device=flat.device))
    lo = (torch.kthvalue(sample, s - lo_rank + 1).values if lo_rank <= s
          else torch.tensor(-math.inf, dtype=flat.dtype, device=flat.device))
    above = int(torch.count_nonzero(flat > hi))
    if above < k:
        window = flat[(flat <= hi) & (flat >= lo)]
        need = k - above
        if need <= window.numel():
            return torch.kthvalue(window, window.numel() - need + 1).values
    return torch.kthvalue(flat, n - k + 1).values


_RADIX_VIEWS = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}


def kth_largest_magnitude(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`kth_largest` of non-negative float32/float64 values, by a one-pass radix histogram.

    Non-negative IEEE floats sort like their bit patterns read as integers, so a histogram of the
    top 16 bits (sign, exponent and the leading mantissa bits) finds the bucket that holds the
    k-th largest value; the exact selection then runs on that bucket alone (about 1/100 of the
    values for smooth data). About twice as fast as the sampled bracket, and exact; other dtypes
    use :func:`kth_largest`.

    Example:
        >>> kth_largest_magnitude(torch.tensor([3.0, 1.0, 7.0, 5.0]), 2).item()
        5.0
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if flat.dtype not in _RADIX_VIEWS or n <= _DIRECT_SELECT or not 1 <= k <= n:
        return kth_largest(flat, k)
    int_dtype, shift = _RADIX_VIEWS[flat.dtype]
    buckets = flat.view(int_dtype) >> shift
    counts = torch.bincount(buckets, minlength=1 << 15)
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype, device=from_top.device)))
    above = int(from_top[position - 1]) if position > 0 else 0
    window = flat[buckets == counts.numel() - 1 - position]
    return torch.kthvalue(window, window.numel() - (k - above) + 1).values


def magnitude(delta: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """Keep the ``max(1, ⌊density·N⌋)`` entries of largest magnitude over the whole tensor (TIES's trim).

    Entries tied with the threshold are all kept. This is the per-tensor trim of PEFT and
    mergekit; the TIES reference code ranks over the whole flattened model instead, which a
    module-at-a-time merge cannot do.

    Example:
        >>> magnitude(torch.tensor([[1.0, -4.0], [3.0, 0.5]]), 0.5).tolist()
        [[0.0, -4.0], [3.0, 0.0]]
    """
    n = delta.numel()
    k = max(1, math.floor(density * n))
    if k >= n:
        return delta
    size = delta.abs()
    # The 0/1 mask is written over the magnitudes: no further m×n buffer (fresh allocations of
    # this size cost page faults on every call).
    keep = size.ge_(kth_largest_magnitude(size, k))
    return delta.mul_(keep) if inplace else delta * keep


def match_l1(kept: torch.Tensor, before: float, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled in place so its L1 norm is ``before`` (mergekit's ``rescale``), unless either is below ``eps``.

    Example:
        >>> match_l1(torch.tensor([[2.0, 0.0, -2.0]]), 8.0).tolist()
        [[4.0, 0.0, -4.0]]
    """
    after = float(kept.abs().sum())
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator, *,
                inplace: bool = False) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the survivors by ``density`` (DARE).

    Unbiased: E[result] = delta. mergekit rescales to the original L1 norm instead of by 1/d,
    which is equal only in expectation.

    Example:
        >>> out = random_drop(torch.ones(4, 1000), 0.25, torch.Generator().manual_seed(0))
        >>> abs(float((out != 0).float().mean()) - 0.25) < 0.02, float(out.max())
        (True, 4.0)
    """
    if density >= 1.0:
        return delta
    out = delta if inplace else torch.empty_like(delta)
    for rows in row_blocks(delta):
        block = delta[rows]
        keep = (torch.rand(block.shape, generator=generator) < density).to(block.device)
        out[rows] = torch.where(keep, block / density, torch.zeros((), dtype=block.dtype, device=block.device))
    return out


def outliers(delta: torch.Tensor, density: float, gamma: float, *, inplace: bool = False) -> torch.Tensor:
    """Per row: drop the ``⌊γ·n⌋`` largest-magnitude entries, keep the next ``max(1, ⌊d·n⌋)``, zero the rest.

    This is Model Breadcrumbs' mask as in its reference code (per row, outliers first). mergekit
    ranks over the whole tensor instead and, when ⌊γ·n⌋ = 0, zeroes everything; here γ·n < 1
    simply removes nothing.

    Example:
        >>> outliers(torch.tensor([[5.0, -4.0, 3.0, 0.1]]), 0.5, 0.25).tolist()
        [[0.0, -4.0, 3.0, 0.0]]
    """
    n = delta.shape[1]
    top = math.floor(gamma * n)
    keep = min(max(1, math.floor(density * n)), n - top)
    if top == 0 and keep >= n:
        return delta
    out = delta if inplace else torch.empty_like(delta)
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    for rows in row_blocks(delta):
        block = delta[rows]
        size = block.abs()
        largest = torch.topk(size, top + keep, dim=1).values
        mask = size >= largest[:, -1:]
        if top:
            mask &= size < largest[:, top - 1 : top]
        out[rows] = torch.where(mask, block, zero)
    return out


def magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *,
             inplace: bool = False) -> torch.Tensor:
    """DELLA's MAGPRUNE: per row, keep probability pᵢ = (d − ε) + 2ε·rankᵢ/(n − 1), survivors divided by pᵢ.

    ``rankᵢ`` is the entry's magnitude rank within its row (0 = smallest), so the kept fraction
    averages ``density`` and larger entries survive more often. As in the DELLA reference code the
    rescale is element-wise 1/pᵢ (mergekit matches the L1 norm instead). ε = 0 is DARE.

    Example:
        >>> out = magprune(torch.arange(1.0, 1001.0).reshape(1, -1), 0.5, 0.4, torch.Generator().manual_seed(0))
        >>> kept = out != 0
        >>> bool(kept[0, :100].float().mean() < 0.3 < 0.7 < kept[0, -100:].float().mean())
        True
    """
    n = delta.shape[1]
    out = delta if inplace else torch.empty_like(delta)
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    steps = torch.arange(n, dtype=delta.dtype, device=delta.device) / max(1, n - 1)
    for rows in row_blocks(delta):
        block = delta[rows]
        # Stable, so tied magnitudes get the same ranks (hence keep probabilities) on every device.
        order = torch.argsort(block.abs(), dim=1, stable=True)
        rank = torch.empty_like(block).scatter_(1, order, steps.expand_as(block))
        if n == 1:
            rank.fill_(0.5)
        keep_probability = (density - epsilon) + 2.0 * epsilon * rank
        draw = torch.rand(block.shape, generator=generator).to(device=block.device, dtype=block.dtype)
        out[rows] = torch.where(draw < keep_probability, block / keep_probability, zero)
    return out


def row_blocks(delta: torch.Tensor, entries: int = _BLOCK_ENTRIES) -> Iterator[slice]:
    """Slices of consecutive rows of about ``entries`` entries each (the same for every device)."""
    rows, cols = delta.shape
    step = max(1, entries // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))
