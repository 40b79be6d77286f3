"""Exact weighted sums of LoRA updates: ``linear``, ``cat`` and ``svd``.

All three compute task arithmetic on the updates (Ilharco et al., "Editing Models with Task
Arithmetic", ICLR 2023), ΔW = Σᵢ wᵢ·sᵢ·Bᵢ Aᵢ, exactly in factor space by concatenation:

    B′ = [c₁·B₁ … c_T·B_T],  A′ = [A₁; …; A_T],  with cᵢ = wᵢ·sᵢ split as √|cᵢ| on each side.

They never average A and B separately: (Σ Bᵢ)(Σ Aᵢ) has cross terms Bᵢ Aⱼ (PEFT's own ``linear``
combination does that; see reference/peft.md §1.3).
"""

from __future__ import annotations

import math

import torch

from loramerge.core.adapter import LowRank
from loramerge.merge.methods.base import MergeMethod, ModuleInputs


def concatenate(inputs: ModuleInputs) -> LowRank:
    """The exact weighted sum Σ wᵢ·sᵢ·Bᵢ Aᵢ as one LoRA of rank Σ rᵢ (scale 1).

    Sources with weight 0 or without the module contribute nothing. A module whose every term
    vanishes becomes a rank-1 zero update, so the output still covers it.

    Example:
        >>> import torch
        >>> a = LowRank(torch.ones(1, 2), torch.ones(3, 1), scale=2.0)
        >>> out = concatenate(ModuleInputs("m", [a, a], [0.5, -1.0]))
        >>> out.rank, [round(v, 6) for v in out.product()[0].tolist()]
        (2, [-1.0, -1.0])
    """
    template = inputs.template
    kept = [(term, weight * term.scale) for term, weight in inputs.present if weight * term.scale != 0.0]
    B0, A0 = template.matrices(template.dtype)
    if not kept:
        return template.from_matrices(torch.zeros_like(B0[:, :1]), torch.zeros_like(A0[:1]), scale=1.0)
    total = sum(term.rank for term, _ in kept)
    B_cat = B0.new_empty((B0.shape[0], total))
    A_cat = A0.new_empty((total, A0.shape[1]))
    start = 0
    for term, c in kept:
        B, A = term.matrices(term.dtype)
        root = math.sqrt(abs(c))
        stop = start + term.rank
        torch.mul(B, math.copysign(root, c), out=B_cat[:, start:stop])
        torch.mul(A, root, out=A_cat[start:stop])
        start = stop
    return template.from_matrices(B_cat, A_cat, scale=1.0)


LINEAR = MergeMethod(
    name="linear",
    function=concatenate,
    summary="Exact weighted sum; stored as a concatenation, or re-ranked with --rank.",
    formula="ΔW = Σ wᵢ·ΔWᵢ",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
)

CAT = MergeMethod(
    name="cat",
    function=concatenate,
    summary="Exact weighted sum, always stored as a concatenation of rank Σ rᵢ.",
    formula="B′ = [w₁s₁B₁ … w_Ts_TB_T], A′ = [A₁; …; A_T]",
    paper="Prabhakar et al., LoRA Soups, COLING 2025 (CAT); PEFT combination_type='cat'",
    accepts_rank=False,
)

SVD = MergeMethod(
    name="svd",
    function=concatenate,
    summary="Exact weighted sum re-ranked by a factored SVD; default rank = largest source rank.",
    formula="ΔW = truncₖ(Σ wᵢ·ΔWᵢ), via QR of the stacked factors and an SVD of the R×R core",
    paper="Eckart & Young 1936 (best rank-k approximation); PEFT combination_type='svd'",
    default_rank="max_source_rank",
)

METHODS = (LINEAR, CAT, SVD)
