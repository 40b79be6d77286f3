"""TIES-merging and magnitude pruning: ``ties``, ``magnitude_prune``.

Yadav, Tam, Choshen, Raffel & Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023. For the weighted updates uᵢ = wᵢ·ΔWᵢ of a module:

1. Trim: keep the ⌊d·N⌋ entries of largest magnitude of each uᵢ (d = ``density``, paper: 0.2).
2. Elect: γ = sgn(Σᵢ ũᵢ) per entry (``majority_sign="total"``, the paper's "mass" rule), or the
   majority of the signs (``"frequency"``); a zero vote counts as +.
3. Disjoint mean: ΔW = λ · mean of the ũᵢ whose sign agrees with γ (zeros excluded).

``magnitude_prune`` (PEFT's ``magnitude_prune``: TIES's trim without election) is
ΔW = λ·Σᵢ trim(uᵢ).

Differences from other tools, all documented in :mod:`loramerge.merge.methods.gta`: the trim ranks
each module's update on its own (the reference code ranks over the whole model; PEFT and
mergekit are per tensor, as here); PEFT elects on the unweighted updates (the same as here when
all weights are equal and positive); mergekit divides by Σ wᵢ over the agreeing sources. PEFT's
``ties`` (without ``_svd``) merges A and B separately, which is not TIES on ΔW.

The result is a dense matrix, re-ranked by the rank policy: by default to the largest source
rank, as PEFT's ``ties_svd`` does; the report gives the energy that truncation keeps.
"""

from __future__ import annotations

from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs
from loramerge.merge.methods.gta import (
    DIVIDE_BY,
    LAMBDA,
    MAJORITY_SIGN,
    RECIPES,
    density_param,
    rescale_param,
    run_entry_method,
)


def ties(inputs: ModuleInputs, *, density: tuple[float, ...], majority_sign: str, lambda_: float,
         divide_by: str = "count", rescale: str = "none") -> MethodOutput:
    """Trim, elect sign, disjoint mean of the weighted updates (dense result)."""
    return run_entry_method(inputs, RECIPES["ties"], density=density, majority_sign=majority_sign, lambda_=lambda_,
                            divide_by=divide_by, rescale=rescale)


def magnitude_prune(inputs: ModuleInputs, *, density: tuple[float, ...], lambda_: float) -> MethodOutput:
    """Trim each weighted update to its largest entries, then sum (dense result)."""
    return run_entry_method(inputs, RECIPES["magnitude_prune"], density=density, lambda_=lambda_)


TIES = MergeMethod(
    name="ties",
    function=ties,
    summary="TIES: keep each update's largest entries, elect a sign per entry, average the agreeing ones.",
    formula="ΔW = λ·mean{ trim_d(wᵢΔWᵢ) : sign agrees with sgn Σᵢ trim_d(wᵢΔWᵢ) }",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
    params=(density_param(0.2), MAJORITY_SIGN, LAMBDA, DIVIDE_BY, rescale_param("none", ("none", "l1"))),
    default_rank="max_source_rank",
    dense=True,
    uses_accelerator=True,
)

MAGNITUDE_PRUNE = MergeMethod(
    name="magnitude_prune",
    function=magnitude_prune,
    summary="Keep each update's largest entries (TIES's trim), then sum; PEFT's magnitude_prune on ΔW.",
    formula="ΔW = λ·Σᵢ trim_d(wᵢΔWᵢ)",
    paper="Yadav et al., NeurIPS 2023 (trim step); PEFT combination_type='magnitude_prune_svd'",
    params=(density_param(0.2), LAMBDA),
    default_rank="max_source_rank",
    dense=True,
    uses_accelerator=True,
)

METHODS = (TIES, MAGNITUDE_PRUNE)
