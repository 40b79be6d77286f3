"""KnOTS: ``knots``.

Stoica, Ramesh, Ecsedi, Choshen & Hoffman, "Model merging with SVD to tie the KnOTS", ICLR 2025.
Per module, with uₜ = wₜ·ΔWₜ:

1. a joint SVD of the column-wise concatenation [u₁ … u_T] = U Σ [V₁ᵀ … V_Tᵀ] (k = its
   numerical rank ≤ R = Σ rₜ), which aligns the tasks in one shared left basis U;
2. each task's coefficients Zₜ = Σ Vₜᵀ (k×n; the scale is inside, so magnitude-based steps
   see it);
3. an ``inner`` per-entry merge of the Zₜ — ``ties`` (the paper's best, KnOTS-TIES),
   ``dare_ties``, ``task_arithmetic``, … — giving Z;
4. ΔW = U Z (λ is the inner merge's).

The SVD is computed from the factors without the m × T·n matrix: [u₁ … u_T] =
B_cat · blockdiag(A₁ … A_T), so a QR of B_cat and one QR per Aₜᵀ reduce it to an R × R core
(algorithms.md §3.1). With ``inner="task_arithmetic"`` the result is exactly Σ uₜ (``linear``).
The inner merge works per module, where the reference code trims over the whole model's
concatenated coefficients. Defaults follow KnOTS-TIES: density 0.2; λ = 1 (the paper tunes λ, 0.6
for eight ViT tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramerge.core.adapter import LowRank
from loramerge.core.linalg import Basis, numerical_rank, orthogonalize
from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs, Param
from loramerge.merge.methods.gta import (
    LAMBDA,
    MAJORITY_SIGN,
    RECIPES,
    check_entry_params,
    density_param,
    epsilon_param,
    gamma_param,
    merge_entries,
)
from loramerge.merge.methods.subspace import scaled_factors, to_lowrank, zero_update


@dataclass(frozen=True)
class Aligned:
    """KnOTS's shared basis U = ``left(core)`` (m×k) and each task's coefficients, transposed: Zₜᵀ = Vₜ Σ (n×k).

    The coefficients are kept as n×k, the layout their lift produces: the entry-wise merge does
    not care about the orientation, and the merged Zᵀ is what the final factorisation reads, so
    no transposed copy is ever made.
    """

    left: Basis
    core: torch.Tensor
    coefficients: list[torch.Tensor]


def aligned_coefficients(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                         scales: list[float] | None = None) -> Aligned:
    """KnOTS's shared basis and per-task coefficients Zₜ = Σ Vₜᵀ of the updates cₜ·Bₜ Aₜ (cₜ = 1 by default).

    The scales are folded into the R×R core, which is decomposed in float64; the coefficients
    come back in the factors' dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pairs = [(torch.randn(6, 2, generator=g, dtype=torch.float64),
        ...           torch.randn(2, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
        >>> aligned = aligned_coefficients(pairs, [0.5, -2.0])
        >>> U = aligned.left(aligned.core)
        >>> all(torch.allclose(U @ z.T, c * B @ A) for z, c, (B, A) in zip(aligned.coefficients, [0.5, -2.0], pairs))
        True
    """
    R_B, basis_B = orthogonalize(torch.cat([B for B, _ in pairs], dim=1))
    R_A, bases_A = zip(*(orthogonalize(A.T) for _, A in pairs))
    if scales is not None:  # cₜ scales task t's columns of B_cat, so of R_B
        R_B = R_B * torch.cat([R_B.new_full((B.shape[1],), c) for (B, _), c in zip(pairs, scales)])
    # [c₁u₁ … c_Tu_T] = B_cat · diag(cₜ) · blockdiag(A₁ … A_T)
    #                 = Q_B · (R_B · diag(cₜ) · blockdiag(R_Aₜᵀ)) · blockdiag(Q_Aₜᵀ)
    U_core, S, Vh_core = torch.linalg.svd(R_B @ torch.block_diag(*(r.T for r in R_A)), full_matrices=False)
    k = numerical_rank(S)
    coefficients, start = [], 0
    for r, basis in zip(R_A, bases_A):
        width = r.shape[0]
        coefficients.append(basis(Vh_core[:k, start:start + width].T * S[:k]))
        start += width
    return Aligned(basis_B, U_core[:, :k], coefficients)


def knots(inputs: ModuleInputs, *, inner: str, density: tuple[float, ...], gamma: tuple[float, ...],
          epsilon: tuple[float, ...], majority_sign: str, lambda_: float) -> MethodOutput | LowRank:
    """KnOTS with the ``inner`` merge on the aligned coefficients (exact, rank ≤ Σ rᵢ)."""
    # The factors stay as stored, in the compute dtype: the Gram matrices and the R×R core are
    # computed in float64 regardless (enough to tell a zero direction from a small one), the
    # weights go into the core, and the entry-wise merge of the coefficients does not need float64.
    indexed = scaled_factors(inputs)
    if not indexed:
        return zero_update(inputs)
    aligned = aligned_coefficients([(B, A) for _, _, B, A in indexed], [c for _, c, _, _ in indexed])
    merged, stats = merge_entries(
        ((index, z) for (index, _, _, _), z in zip(indexed, aligned.coefficients)), RECIPES[inner],
        generator=inputs.generator, density=density, gamma=gamma, epsilon=epsilon,
        majority_sign=majority_sign, lambda_=lambda_,
    )
    assert merged is not None
    stats["aligned_rank"] = float(aligned.core.shape[1])
    # Balanced factors of U Z over Z's non-zero spectrum: with Zᵀ = Q R and Rᵀ = P S Wᵀ,
    # U Z = (U P √S)(√S Wᵀ Qᵀ). U P is formed on the R×k core before it is lifted to m rows.
    R, basis = orthogonalize(merged)
    P, S, Wh = torch.linalg.svd(R.T, full_matrices=False)
    keep = numerical_rank(S)
    root = S[:keep].sqrt()
    B, A = aligned.left((aligned.core @ P[:, :keep]) * root), basis(Wh[:keep].T * root).T
    return MethodOutput(to_lowrank(inputs, B, A), stats)


KNOTS = MergeMethod(
    name="knots",
    function=knots,
    summary="KnOTS: joint SVD aligns the updates, then an inner merge (default TIES) of their coefficients.",
    formula="[w₁ΔW₁ … w_TΔW_T] = U Σ [V₁ᵀ … V_Tᵀ];  ΔW = U · inner(ΣV₁ᵀ, …, ΣV_Tᵀ)",
    paper="Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025",
    params=(
        Param("inner", "ties", str, "Merge applied in the aligned space.", choices=tuple(RECIPES)),
        density_param(0.2), gamma_param(0.006), epsilon_param(0.1), MAJORITY_SIGN, LAMBDA,
    ),
    check=check_entry_params,
)

METHODS = (KNOTS,)
