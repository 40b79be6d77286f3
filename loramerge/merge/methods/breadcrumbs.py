"""Model Breadcrumbs: ``breadcrumbs``.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024. Each weighted update loses its largest-magnitude outliers and its small entries, per
row, as in the reference code: in every row of n entries, drop the ⌊γ·n⌋ largest (``gamma``)
and keep the next ⌊d·n⌋ (``density``); then sum:

    ΔW = λ · Σᵢ mask_{d,γ}(wᵢΔWᵢ)

Defaults d = 0.15, γ = 0.006: the starting point of the reference hyper-parameter search, which
the paper reports to transfer across tasks. mergekit ranks over the whole tensor instead of per
row (and zeroes the whole tensor when ⌊γ·N⌋ = 0); gamma + density must not exceed 1.
"""

from __future__ import annotations

from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs
from loramerge.merge.methods.gta import (
    LAMBDA,
    RECIPES,
    check_entry_params,
    density_param,
    gamma_param,
    run_entry_method,
)


def breadcrumbs(inputs: ModuleInputs, *, density: tuple[float, ...], gamma: tuple[float, ...],
                lambda_: float) -> MethodOutput:
    """Drop each row's outliers and small entries of every weighted update, then sum (dense result)."""
    return run_entry_method(inputs, RECIPES["breadcrumbs"], density=density, gamma=gamma, lambda_=lambda_)


BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    function=breadcrumbs,
    summary="Breadcrumbs: per row, drop the largest γ and keep the next d of each update, then sum.",
    formula="ΔW = λ·Σᵢ mask_{d,γ}(wᵢΔWᵢ)  (per row: drop top ⌊γn⌋, keep next ⌊dn⌋)",
    paper="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024",
    params=(density_param(0.15), gamma_param(0.006), LAMBDA),
    default_rank="max_source_rank",
    dense=True,
    uses_accelerator=True,
    check=check_entry_params,
)

METHODS = (BREADCRUMBS,)
