"""Task Singular Vectors merge: ``tsv``.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodolà, "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025 (TSV-M). Per module, with uₜ = wₜ·ΔWₜ:

1. uₜ = Uₜ Σₜ Vₜᵀ, truncated to its top kₜ = min(rank uₜ, ⌊min(m, n)/T⌋) directions;
2. U = [U₁ … U_T], V = [V₁ … V_T], Σ = diag(Σ₁ … Σ_T);
3. replace U and V by their orthonormal polar factors U⊥, V⊥ (U = P S Qᵀ → P Qᵀ), which
   decorrelates the task subspaces;
4. ΔW = λ · U⊥ Σ V⊥ᵀ.

Each uₜ's SVD comes from its factors (QR + an rₜ×rₜ core), so the cost is O((m + n)·R²) and the
output has rank ≤ R = Σ rₜ, stored exactly. On LoRA updates only the rₜ non-zero directions of
each task are used: the reference code keeps ⌊min(m, n)/T⌋ per task, which on a low-rank update
pulls in null directions that then enter the orthogonalisation (algorithms.md §7.5). Likewise the
polar factors are taken over the non-zero spectrum, so duplicated sources do not invent
directions. Default λ = 1, the papers' value without validation data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.core.adapter import LowRank
from loramerge.core.linalg import numerical_rank, polar_factor
from loramerge.merge.methods.base import MergeMethod, ModuleInputs
from loramerge.merge.methods.gta import LAMBDA
from loramerge.merge.methods.subspace import Pair, empty_pair, scaled_pairs, shared_cores, to_lowrank


def tsv_pairs(pairs: Sequence[Pair], space: int | None = None, scales: Sequence[float] | None = None) -> Pair:
    """TSV-M of updates given as factor pairs ``(B, A)`` (the work is in float64); returns balanced factors.

    Each task keeps at most ⌊space/T⌋ directions, ``space`` being min(m, n) of the full update
    (by default, of the pairs themselves).

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> B, A = tsv_pairs([(e[:, :1] * 3, e[:1]), (e[:, 1:2], e[1:2])])
        >>> [round(v, 6) for v in torch.diagonal(B @ A).tolist()]
        [3.0, 1.0, 0.0, 0.0]
    """
    if not pairs:
        return empty_pair(pairs)
    if space is None:
        space = min(pairs[0][0].shape[0], pairs[0][1].shape[1])
    budget = max(1, space // len(pairs))
    # TSV is rotation-equivariant: it runs on the R×R cores of the shared bases, and only the
    # output's columns are lifted back to m and n.
    shared = shared_cores(pairs, scales)
    Us, Ss, Vs = [], [], []
    for core in shared.cores:
        P, S, Wh = torch.linalg.svd(core, full_matrices=False)
        k = min(budget, numerical_rank(S))
        Us.append(P[:, :k])
        Ss.append(S[:k])
        Vs.append(Wh[:k].T)
    S = torch.cat(Ss)
    if S.numel() == 0:
        return empty_pair(pairs)
    root = S.sqrt()
    return shared.lift(polar_factor(torch.cat(Us, dim=1)) * root, polar_factor(torch.cat(Vs, dim=1)) * root)


def tsv(inputs: ModuleInputs, *, lambda_: float) -> LowRank:
    """TSV-M on one module, from the factors (rank ≤ Σ rᵢ, exact)."""
    # As stored: the weights go into the float64 cores, and only the output is lifted.
    pairs, scales = scaled_pairs(inputs)
    return to_lowrank(inputs, *tsv_pairs(pairs, scales=scales), scale=lambda_)


TSV = MergeMethod(
    name="tsv",
    function=tsv,
    summary="TSV-M: each update's singular vectors, orthogonalised across tasks (polar factor); exact rank ≤ Σ rᵢ.",
    formula="ΔW = λ·polar([U₁…U_T]) diag(Σ₁…Σ_T) polar([V₁…V_T])ᵀ",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
    params=(LAMBDA,),
)

METHODS = (TSV,)
