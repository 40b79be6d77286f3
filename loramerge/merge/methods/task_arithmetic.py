"""Task arithmetic with a global scale: ``task_arithmetic``.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023:

    ΔW = λ · Σᵢ wᵢ·ΔWᵢ,   ΔWᵢ = sᵢ·Bᵢ Aᵢ

It is the generalized task-arithmetic core with no sparsifier and no sign election (see
:mod:`loramerge.merge.methods.gta`). With nothing to do entry by entry it is computed exactly in factor
space, by concatenation, like ``linear``; ``linear`` is the case λ = 1. The papers tune λ on
validation data (e.g. 0.3–0.4 for eight tasks); the default λ = 1 is the plain sum.
"""

from __future__ import annotations

from dataclasses import replace

from loramerge.core.adapter import LowRank
from loramerge.merge.methods.base import MergeMethod, ModuleInputs, Param
from loramerge.merge.methods.gta import LAMBDA
from loramerge.merge.methods.linear import concatenate


def task_arithmetic(inputs: ModuleInputs, *, lambda_: float, normalize: bool = False) -> LowRank:
    """λ·Σ wᵢ·ΔWᵢ, exact, as a concatenated LoRA of rank Σ rᵢ; with ``normalize``, divided by Σ wᵢ.

    ``normalize`` is mergekit's (its ``linear`` default): the sum of every source's weight at this
    module, including sources without it, as mergekit sums the weights of all its models (a sum
    below 1e-8 in magnitude counts as 1).

    Example:
        >>> import torch
        >>> a = LowRank(torch.ones(1, 2), torch.ones(3, 1))
        >>> out = task_arithmetic(ModuleInputs("m", [a, a], [1.0, 1.0]), lambda_=0.5)
        >>> [round(v, 5) for v in out.product()[0].tolist()]
        [1.0, 1.0]
    """
    summed = concatenate(inputs)
    total = sum(inputs.weights)
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    return replace(summed, scale=summed.scale * lambda_ / divisor)


TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    function=task_arithmetic,
    summary="λ times the exact weighted sum (linear with a scale); stored exactly unless re-ranked.",
    formula="ΔW = λ·Σ wᵢ·ΔWᵢ",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    params=(LAMBDA, Param("normalize", False, bool, "Divide by the sum of the weights (mergekit's normalize).")),
)

METHODS = (TASK_ARITHMETIC,)
