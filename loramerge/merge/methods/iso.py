"""Isotropic merging: ``iso_c`` and ``iso_cts``.

Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer, "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025. With uₜ = wₜ·ΔWₜ and the
sum Δ = Σₜ uₜ = U Σ Vᵀ of rank ρ:

- Iso-C: ΔW = λ · σ̄ U Vᵀ, σ̄ = (1/ρ) Σᵢ σᵢ — the sum's directions with a flat spectrum.
- Iso-CTS: keep the top k ≈ f·ρ directions of Δ (f = ``common_fraction``, paper 0.8, adjusted
  so that ρ − k splits evenly over the T tasks); for each task take the top (ρ − k)/T directions
  of its residual (I − U_k U_kᵀ) uₜ; stack common and task-specific U's and V's, replace each by
  its orthonormal polar factor, and set every singular value to the mean σ̄ of the selected ones:
  ΔW = λ · σ̄ U⊥ V⊥ᵀ.

**Non-zero spectrum only.** The reference code (and FusionBench's copy) averages σ over all
min(m, n) singular values and rebuilds σ̄ U Vᵀ with every singular vector, including those of the
zero singular values of a low-rank sum: the output becomes full-rank, with most of its energy in
directions that LAPACK chose arbitrarily (83 % for 8 rank-16 tasks on 768×768; algorithms.md
§7.1). Here ρ is the numerical rank of the sum, so rank(ΔW) ≤ rank(Δ) ≤ Σ rₜ, computed from the
factors in O((m + n)·R²); the published LoRA numbers came from the full-spectrum variant. Default
λ = 1 (the papers tune λ on validation data, typically 1–1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.core.adapter import LowRank
from loramerge.core.linalg import numerical_rank, polar_factor
from loramerge.merge.methods.base import MergeMethod, ModuleInputs, Param
from loramerge.merge.methods.gta import LAMBDA
from loramerge.merge.methods.subspace import (
    Pair,
    empty_pair,
    scaled_pairs,
    shared_cores,
    to_lowrank,
)


def iso_c_pairs(pairs: Sequence[Pair], scales: Sequence[float] | None = None) -> Pair:
    """Iso-C of factor pairs (``scales`` multiply their products): the sum's singular vectors with the mean singular value.

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> B, A = iso_c_pairs([(e[:, :1] * 3, e[:1]), (e[:, 1:2], e[1:2])])
        >>> [round(v, 6) for v in torch.diagonal(B @ A).tolist()]
        [2.0, 2.0, 0.0]
    """
    if not pairs:
        return empty_pair(pairs)
    # The sum is Q_B (Σ Cₜ) Q_Aᵀ: its SVD is the R×R core's, lifted only for the kept directions.
    shared = shared_cores(pairs, scales)
    P, S, Wh = torch.linalg.svd(shared.total, full_matrices=False)
    k = numerical_rank(S)
    if k == 0:
        return empty_pair(pairs)
    root = S[:k].mean().sqrt()
    return shared.lift(P[:, :k] * root, Wh[:k].T * root)


def iso_cts_pairs(pairs: Sequence[Pair], common_fraction: float, scales: Sequence[float] | None = None) -> Pair:
    """Iso-CTS of factor pairs (the work is in float64; ``scales`` multiply their products) over the sum's
    non-zero spectrum (see the module docstring).

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> B, A = iso_cts_pairs([(e[:, :2] * 3, e[:2]), (e[:, 2:3], e[2:3])], 0.5)
        >>> [round(v, 6) for v in torch.diagonal(B @ A).tolist()]
        [2.333333, 2.333333, 2.333333, 0.0]
    """
    if not pairs:
        return empty_pair(pairs)
    # Everything below is rotation-equivariant, so it runs on the R×R cores of the shared bases and
    # lifts only the output's columns (the residuals of B - U_k U_kᵀ B are rank-deficient tall
    # matrices, which would otherwise each need a Householder QR).
    shared = shared_cores(pairs, scales)
    P, S, Wh = torch.linalg.svd(shared.total, full_matrices=False)
    rho, tasks = numerical_rank(S), len(pairs)
    if rho == 0:
        return empty_pair(pairs)
    common = int(rho * common_fraction)
    per_task = round((rho - common) / tasks)
    common = max(0, rho - per_task * tasks)
    Uk, Vk = P[:, :common], Wh[:common].T
    Us, Ss, Vs = [Uk], [S[:common]], [Vk]
    for core in shared.cores:
        if per_task == 0:
            break
        P_t, S_t, Wh_t = torch.linalg.svd(core - Uk @ (Uk.T @ core), full_matrices=False)
        # Judged against the sum's scale: a residual that is numerically zero holds only noise,
        # which its own largest singular value would not reveal.
        k = min(per_task, numerical_rank(S_t, scale=float(S[0])))
        Us.append(P_t[:, :k])
        Ss.append(S_t[:k])
        Vs.append(Wh_t[:k].T)
    root = torch.cat(Ss).mean().sqrt()
    return shared.lift(polar_factor(torch.cat(Us, dim=1)) * root, polar_factor(torch.cat(Vs, dim=1)) * root)


def iso_c(inputs: ModuleInputs, *, lambda_: float) -> LowRank:
    """Iso-C on one module, from the factors (rank ≤ rank of the sum, exact)."""
    pairs, scales = scaled_pairs(inputs)
    return to_lowrank(inputs, *iso_c_pairs(pairs, scales), scale=lambda_)


def iso_cts(inputs: ModuleInputs, *, common_fraction: float, lambda_: float) -> LowRank:
    """Iso-CTS on one module, from the factors (rank ≤ rank of the sum, exact)."""
    # As stored: the weights go into the float64 cores, and only the output is lifted.
    pairs, scales = scaled_pairs(inputs)
    return to_lowrank(inputs, *iso_cts_pairs(pairs, common_fraction, scales), scale=lambda_)


COMMON_FRACTION = Param(
    "common_fraction", 0.8, float, "Iso-CTS: share of the sum's rank given to the common subspace, in [0, 1].",
    check=lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]",
)

ISO_C = MergeMethod(
    name="iso_c",
    function=iso_c,
    summary="Iso-C: the sum's singular directions with a flat spectrum (mean σ), non-zero spectrum only.",
    formula="Σᵢ wᵢΔWᵢ = UΣVᵀ;  ΔW = λ·mean(σ)·U Vᵀ",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025",
    params=(LAMBDA,),
)

ISO_CTS = MergeMethod(
    name="iso_cts",
    function=iso_cts,
    summary="Iso-CTS: common directions of the sum plus each task's own residual directions, flat spectrum.",
    formula="ΔW = λ·σ̄·polar([U_common, U₁ᵗˢ…])·polar([V_common, V₁ᵗˢ…])ᵀ",
    paper="Marczak et al., ICML 2025 (Iso-CTS)",
    params=(COMMON_FRACTION, LAMBDA),
)

METHODS = (ISO_C, ISO_CTS)
