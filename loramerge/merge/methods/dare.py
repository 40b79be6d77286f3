"""DARE (drop and rescale): ``dare_linear``, ``dare_ties``.

Yu, Yu, Yu, Huang & Li, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", ICML 2024. Each weighted update uᵢ = wᵢ·ΔWᵢ keeps every entry with
probability d (``density`` = 1 − the paper's drop rate p) and the survivors are divided by d:

    ũᵢ = mᵢ ⊙ uᵢ / d,   mᵢ ~ Bernoulli(d) entry-wise,   E[ũᵢ] = uᵢ

``dare_linear``: ΔW = λ·Σᵢ ũᵢ. ``dare_ties``: TIES's sign election and disjoint mean on the ũᵢ
(see :mod:`loramerge.merge.methods.ties`).

The masks are seeded per module and per source from ``seed`` (see
:meth:`~loramerge.merge.methods.base.ModuleInputs.generator`), drawn on the CPU, so a merge is
reproducible byte for byte on any device and in any module order. mergekit rescales the
survivors to the original L1 norm instead of by 1/d (equal only in expectation) and its
``dare_ties`` sums instead of averaging the agreeing entries; PEFT draws from the global RNG.

Default density 0.5: the paper drops 90 % and more of full fine-tuning deltas of large models,
but LoRA merges in the KnOTS and Core Space experiments drop 10–50 %.
"""

from __future__ import annotations

from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs
from loramerge.merge.methods.gta import (
    DIVIDE_BY,
    LAMBDA,
    MAJORITY_SIGN,
    RECIPES,
    RESCALES,
    density_param,
    rescale_param,
    run_entry_method,
)


def dare_linear(inputs: ModuleInputs, *, density: tuple[float, ...], lambda_: float,
                rescale: str = "inverse") -> MethodOutput:
    """Random drop with 1/d rescale of each weighted update, then sum (dense result)."""
    return run_entry_method(inputs, RECIPES["dare_linear"], density=density, lambda_=lambda_, rescale=rescale)


def dare_ties(inputs: ModuleInputs, *, density: tuple[float, ...], majority_sign: str, lambda_: float,
              divide_by: str = "count", rescale: str = "inverse") -> MethodOutput:
    """Random drop with 1/d rescale, then TIES's sign election and disjoint mean (dense result)."""
    return run_entry_method(inputs, RECIPES["dare_ties"], density=density, majority_sign=majority_sign,
                            lambda_=lambda_, divide_by=divide_by, rescale=rescale)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    function=dare_linear,
    summary="DARE: drop entries at random (keep d), rescale by 1/d, sum.",
    formula="ΔW = λ·Σᵢ mᵢ⊙wᵢΔWᵢ/d,  mᵢ ~ Bernoulli(d)",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024",
    params=(density_param(0.5), LAMBDA, rescale_param("inverse", RESCALES)),
    default_rank="max_source_rank",
    dense=True,
    uses_accelerator=True,
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    function=dare_ties,
    summary="DARE's random drop and 1/d rescale, then TIES's sign election and disjoint mean.",
    formula="ũᵢ = mᵢ⊙wᵢΔWᵢ/d;  ΔW = λ·mean{ ũᵢ : sign agrees with sgn Σᵢ ũᵢ }",
    paper="Yu et al., ICML 2024 (DARE) with Yadav et al., NeurIPS 2023 (TIES)",
    params=(density_param(0.5), MAJORITY_SIGN, LAMBDA, DIVIDE_BY, rescale_param("inverse", RESCALES)),
    default_rank="max_source_rank",
    dense=True,
    uses_accelerator=True,
)

METHODS = (DARE_LINEAR, DARE_TIES)
