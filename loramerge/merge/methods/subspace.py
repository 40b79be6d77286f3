"""Helpers of the SVD-space methods (KnOTS, TSV, Iso, Core Space): factors in float64, balanced output.

These methods only ever touch the factors: their cost grows with the total rank R = Σ rᵢ, as
O((m + n)·R²), never with m·n. They compute in float64 (cheap at these sizes), so that a
singular value below ``RANK_RTOL``·σ₁ is an exact rank deficiency, not rounding noise, and can be
dropped without inventing directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge.core.adapter import LowRank
from loramerge.core.linalg import Basis, factored_svd, orthogonalize
from loramerge.merge.methods.base import ModuleInputs

Pair = tuple[torch.Tensor, torch.Tensor]


def scaled_factors(inputs: ModuleInputs) -> list[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """``(source index, cᵢ = wᵢ·sᵢ, Bᵢ, Aᵢ)`` as stored, in the compute dtype (present sources, cᵢ ≠ 0).

    For methods that fold cᵢ into a small core instead of scaling (and copying) the factors.
    """
    out = []
    for index, (term, weight) in enumerate(zip(inputs.terms, inputs.weights)):
        if term is not None and weight * term.scale != 0.0:
            B, A = term.matrices(term.dtype)
            out.append((index, weight * term.scale, B, A))
    return out


def scaled_pairs(inputs: ModuleInputs) -> tuple[list[Pair], list[float]]:
    """:func:`scaled_factors` split into the factor pairs ``(Bᵢ, Aᵢ)`` and their scales ``cᵢ``."""
    factors = scaled_factors(inputs)
    return [(B, A) for _, _, B, A in factors], [c for _, c, _, _ in factors]


def empty_pair(pairs: Sequence[Pair]) -> Pair:
    """Factors of rank 0 with the shapes, dtype and device of ``pairs`` (a merge that produced nothing).

    They go on where the pairs are: a caller multiplies them with its own bases (Core Space lifts
    its inner merge's output), so CPU zeros would meet device tensors.

    Example:
        >>> B, A = empty_pair([(torch.ones(5, 2, device="meta"), torch.ones(2, 3, device="meta"))])
        >>> B.shape, A.shape, B.device.type
        (torch.Size([5, 0]), torch.Size([0, 3]), 'meta')
    """
    if not pairs:
        return torch.zeros(1, 0, dtype=torch.float64, device="cpu"), torch.zeros(0, 1, dtype=torch.float64, device="cpu")
    B, A = pairs[0]
    return B.new_zeros((B.shape[0], 0)), A.new_zeros((0, A.shape[1]))


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


@dataclass(frozen=True)
class SharedCores:
    """The updates Bₜ Aₜ as ``Q_B Cₜ Q_Aᵀ`` over bases shared by every task: each Cₜ is only R×R.

    ``Q_B`` spans the columns of [B₁ … B_T] and ``Q_A`` the rows of [A₁; …; A_T], so every task
    and every sum of tasks lives in ``span(Q_B) × span(Q_A)``. A rotation-equivariant method
    (TSV, Iso) can then run entirely on the small cores and lift only its output's columns, at
    the cost of the stacked factors' orthogonalisation (the same as ``svd``'s).
    """

    cores: list[torch.Tensor]
    total: torch.Tensor
    left: Basis
    right: Basis
    left_factor: torch.Tensor  # R_B (its columns scaled by cₜ), so [c₁B₁ … c_TB_T] = Q_B R_B
    right_factor: torch.Tensor  # R_A, so [A₁; …; A_T]ᵀ = Q_A R_A

    def lift(self, left: torch.Tensor, right: torch.Tensor) -> Pair:
        """Matrix factors ``(Q_B·left, (Q_A·right)ᵀ)`` of the product ``Q_B left rightᵀ Q_Aᵀ``."""
        return self.left(left), self.right(right).T


def shared_cores(pairs: Sequence[Pair], scales: Sequence[float] | None = None) -> SharedCores:
    """Cores Cₜ = cₜ R_B[:, t] R_A[:, t]ᵀ of [B₁ … B_T] = Q_B R_B and [A₁; …; A_T]ᵀ = Q_A R_A, and their sum.

    The cores are float64 whatever the factors' dtype; the lifts run in the factors' dtype. The
    scales cₜ (default 1) are applied to the float64 cores, not to the factors: scaling float32
    factors would round them, and a source added twice at two weights would no longer be an
    exact rank deficiency.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pairs = [(torch.randn(6, 2, generator=g, dtype=torch.float64),
        ...           torch.randn(2, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
        >>> shared = shared_cores(pairs)
        >>> B, A = shared.lift(shared.cores[1], torch.eye(4, dtype=torch.float64))
        >>> bool(torch.allclose(B @ A, pairs[1][0] @ pairs[1][1]))
        True
    """
    R_B, left = orthogonalize(torch.cat([B for B, _ in pairs], dim=1))
    R_A, right = orthogonalize(torch.cat([A for _, A in pairs], dim=0).T)
    if scales is not None:
        R_B = R_B * torch.cat([R_B.new_full((B.shape[1],), c) for (B, _), c in zip(pairs, scales)])
    cores, start = [], 0
    for B, _ in pairs:
        stop = start + B.shape[1]
        cores.append(R_B[:, start:stop] @ R_A[:, start:stop].T)
        start = stop
    return SharedCores(cores, R_B @ R_A.T, left, right, R_B, R_A)


def to_lowrank(inputs: ModuleInputs, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRank:
    """A LoRA of the module's kind and layout from matrix factors, in the compute dtype on the compute device.

    An empty product (every source had weight 0) becomes a rank-1 zero update (:func:`zero_update`).
    """
    if B.shape[1] == 0:
        return zero_update(inputs)
    template = inputs.template
    dtype, device = template.dtype, template.A.device
    return template.from_matrices(B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype), scale=scale)


def zero_update(inputs: ModuleInputs) -> LowRank:
    """A rank-1 zero update of the module's kind and layout, made where the module's factors are.

    Example:
        >>> term = LowRank(torch.ones(2, 3, device="meta"), torch.ones(4, 2, device="meta"))
        >>> out = zero_update(ModuleInputs("m", [term], [0.0]))
        >>> out.rank, out.A.device.type
        (1, 'meta')
    """
    template = inputs.template
    m, n = template.matrix_shape
    return template.from_matrices(template.A.new_zeros((m, 1)), template.A.new_zeros((1, n)))
