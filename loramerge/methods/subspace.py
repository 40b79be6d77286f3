"""Helpers of the SVD-space methods (KnOTS, TSV, Iso, Core Space): factors in float64, balanced output.

These methods only ever touch the factors: their cost grows with the total rank R = Σ rᵢ, as
O((m + n)·R²), never with m·n. They compute in float64 (cheap at these sizes), so that a
singular value below ``RANK_RTOL``·σ₁ is an exact rank deficiency, not rounding noise, and can be
dropped without inventing directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.adapter import LowRank
from loramerge.linalg import factored_svd, numerical_rank, orthogonalize
from loramerge.methods.base import ModuleInputs

Pair = tuple[torch.Tensor, torch.Tensor]


def weighted_pairs(inputs: ModuleInputs) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(source index, B, A)`` in float64 with ``B @ A = wᵢ·sᵢ·Bᵢ Aᵢ`` (present sources, non-zero weight)."""
    return inputs.weighted_factors(torch.float64)


def empty_pair(pairs: Sequence[Pair]) -> Pair:
    """Factors of rank 0 with the shapes of ``pairs`` (a merge that produced nothing)."""
    m, n = (pairs[0][0].shape[0], pairs[0][1].shape[1]) if pairs else (1, 1)
    return torch.zeros(m, 0, dtype=torch.float64), torch.zeros(0, n, dtype=torch.float64)


def balanced(B: torch.Tensor, A: torch.Tensor) -> Pair:
    """The same product ``B @ A`` as factors ``U√σ, √σVᵀ`` over its non-zero spectrum only.

    Example:
        >>> B, A = torch.ones(4, 2, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
        >>> b, a = balanced(B, A)
        >>> b.shape[1], bool(torch.allclose(b @ a, B @ A))
        (1, True)
    """
    svd = factored_svd(B, A).nonzero()
    return svd.factors(svd.rank)


def balanced_after(U: torch.Tensor, Z: torch.Tensor) -> Pair:
    """Balanced factors of ``U @ Z`` when ``U`` has orthonormal columns: only ``Z`` is decomposed.

    Example:
        >>> U = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0]
        >>> Z = torch.randn(2, 5, dtype=torch.float64)
        >>> b, a = balanced_after(U, Z)
        >>> bool(torch.allclose(b @ a, U @ Z))
        True
    """
    R, basis = orthogonalize(Z.T)  # Z = Rᵀ Qᵀ
    P, S, Wh = torch.linalg.svd(R.T, full_matrices=False)
    keep = numerical_rank(S)
    root = S[:keep].sqrt()
    return (U @ P[:, :keep]) * root, (basis(Wh[:keep].T) * root).T


def to_lowrank(inputs: ModuleInputs, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRank:
    """A LoRA of the module's kind and layout from float64 matrix factors, in the compute dtype.

    An empty product (every source had weight 0) becomes a rank-1 zero update.
    """
    template = inputs.template
    dtype, device = template.dtype, template.A.device
    if B.shape[1] == 0:
        m, n = template.matrix_shape
        B, A = torch.zeros(m, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    return template.from_matrices(B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype), scale=scale)
