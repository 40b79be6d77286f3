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

import torch

from loramerge.adapter import LowRank
from loramerge.linalg import numerical_rank, orthogonalize
from loramerge.methods.base import MergeMethod, MethodOutput, ModuleInputs, Param
from loramerge.methods.gta import (
    LAMBDA,
    MAJORITY_SIGN,
    RECIPES,
    check_entry_params,
    density_param,
    epsilon_param,
    gamma_param,
    merge_entries,
)
from loramerge.methods.subspace import balanced_after, to_lowrank, weighted_pairs


def aligned_coefficients(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KnOTS's shared basis U (m×k) and per-task coefficients Zₜ = Σ Vₜᵀ (k×n), from float64 factors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pairs = [(torch.randn(6, 2, generator=g, dtype=torch.float64),
        ...           torch.randn(2, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
        >>> U, Z = aligned_coefficients(pairs)
        >>> all(torch.allclose(U @ z, B @ A) for z, (B, A) in zip(Z, pairs))
        True
    """
    R_B, basis_B = orthogonalize(torch.cat([B for B, _ in pairs], dim=1))
    R_A, bases_A = zip(*(orthogonalize(A.T) for _, A in pairs))
    # [u₁ … u_T] = B_cat · blockdiag(A₁ … A_T) = Q_B · (R_B · blockdiag(R_Aₜᵀ)) · blockdiag(Q_Aₜᵀ)
    U_core, S, Vh_core = torch.linalg.svd(R_B @ torch.block_diag(*(r.T for r in R_A)), full_matrices=False)
    k = numerical_rank(S)
    coefficients, start = [], 0
    for r, basis in zip(R_A, bases_A):
        width = r.shape[0]
        coefficients.append(basis(Vh_core[:k, start:start + width].T * S[:k]).T.contiguous())
        start += width
    return basis_B(U_core[:, :k]), coefficients


def knots(inputs: ModuleInputs, *, inner: str, density: tuple[float, ...], gamma: tuple[float, ...],
          epsilon: tuple[float, ...], majority_sign: str, lambda_: float) -> MethodOutput | LowRank:
    """KnOTS with the ``inner`` merge on the aligned coefficients (exact, rank ≤ Σ rᵢ)."""
    indexed = weighted_pairs(inputs)
    if not indexed:
        return to_lowrank(inputs, torch.zeros(1, 0), torch.zeros(0, 1))
    U, coefficients = aligned_coefficients([(B, A) for _, B, A in indexed])
    # The basis needs float64 to tell a zero direction from a small one; the entry-wise merge of the
    # coefficients does not, and runs in the compute dtype (half the memory traffic).
    compute = inputs.template.dtype
    merged, stats = merge_entries(
        ((index, z.to(compute)) for (index, _, _), z in zip(indexed, coefficients)), RECIPES[inner],
        generator=inputs.generator, density=density, gamma=gamma, epsilon=epsilon,
        majority_sign=majority_sign, lambda_=lambda_,
    )
    assert merged is not None
    stats["aligned_rank"] = float(U.shape[1])
    return MethodOutput(to_lowrank(inputs, *balanced_after(U, merged.double())), stats)


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
