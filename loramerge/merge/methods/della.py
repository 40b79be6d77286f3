"""DELLA-Merging (MAGPRUNE, elect, fuse): ``della``.

Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv 2406.11617, 2024.

1. Drop (MAGPRUNE): in each row of n entries of wᵢΔWᵢ, the entry of magnitude rank r (0 =
   smallest) survives with probability p_r = (d − ε) + 2ε·r/(n − 1) and is divided by p_r.
2. Elect: γ = sgn(Σᵢ ũᵢ) per entry (or the majority of signs, ``majority_sign="frequency"``).
3. Fuse: ΔW = λ · mean of the agreeing ũᵢ (as TIES).

Keep probabilities must lie in (0, 1]: 0 ≤ ε < d and d + ε ≤ 1. Defaults d = 0.5, ε = 0.1 (the
paper tunes both; mergekit's default ε is 0.15). The reference code (a mergekit fork) ranks per
row and rescales element-wise by 1/p, as here; current mergekit rescales to the L1 norm. Masks
are seeded per module and per source, as for DARE.
"""

from __future__ import annotations

from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs
from loramerge.merge.methods.gta import (
    LAMBDA,
    MAJORITY_SIGN,
    RECIPES,
    check_entry_params,
    density_param,
    epsilon_param,
    run_entry_method,
)


def della(inputs: ModuleInputs, *, density: tuple[float, ...], epsilon: tuple[float, ...], majority_sign: str,
          lambda_: float) -> MethodOutput:
    """Magnitude-ranked random drop with 1/p rescale, sign election, disjoint mean (dense result)."""
    return run_entry_method(inputs, RECIPES["della"], density=density, epsilon=epsilon, majority_sign=majority_sign,
                            lambda_=lambda_)


DELLA = MergeMethod(
    name="della",
    function=della,
    summary="DELLA: drop entries with probability falling with magnitude rank, rescale by 1/p, TIES election.",
    formula="p_r = d − ε + 2ε·r/(n−1) per row;  ũᵢ = mᵢ⊙wᵢΔWᵢ/p;  ΔW = λ·mean{ ũᵢ : agreeing sign }",
    paper="Deep, Bhardwaj & Poria, DELLA-Merging, arXiv 2406.11617, 2024",
    params=(density_param(0.5), epsilon_param(0.1), MAJORITY_SIGN, LAMBDA),
    default_rank="max_source_rank",
    dense=True,
    uses_accelerator=True,
    check=check_entry_params,
)

METHODS = (DELLA,)
