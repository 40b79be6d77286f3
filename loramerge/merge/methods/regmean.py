"""RegMean, the first data-aware method: ``regmean``.

Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023. For a linear layer, the merged weight that best reproduces every source's
outputs on its own inputs, min_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖², is W* = (Σᵢ Wᵢ Gᵢ)(Σᵢ Gᵢ)⁻¹ with
Gᵢ = Xᵢᵀ Xᵢ. The base weight cancels, so on LoRA updates (weights wᵢ):

    ΔW* = (Σᵢ wᵢ ΔWᵢ G̃ᵢ)(Σⱼ G̃ⱼ)⁻¹,   G̃ = a·G + (1 − a)·diag(G),   a = ``off_diagonal``

Gᵢ is the mean of x·xᵀ over the non-padding token positions of source i's data, x being the
layer's input while the base model runs with source i's adapter (collected by
:mod:`loramerge.runtime.statistics`; this module only receives the Grams). Shrinking the
off-diagonal entries (a < 1) regularizes the inverse; a = 1 is the plain least-squares solution,
a = 0 a per-input-channel weighted average.

Stored exactly and factored, never as an m×n matrix: ΔW* = Σᵢ Bᵢ·(wᵢ sᵢ Aᵢ G̃ᵢ (Σⱼ G̃ⱼ)⁻¹), a
LoRA of rank ≤ Σ rᵢ (the rank options re-rank it like any other result). The n×n solve runs in
float64.

Two decisions the paper leaves open, for LoRAs:

- **A module only some sources have**: a source without it leaves the base weight there, so its
  update is ΔWᵢ = 0 *and its Gram still counts* in Σⱼ G̃ⱼ. That is the least-squares objective
  above with Wᵢ = W₀; it pulls the merged update towards the base on that source's inputs.
- **Modules that are not Linear** (embeddings, convolutions): their inputs are not vectors that a
  Gram describes, so they get what RegMean reduces to when every Gram is the same, the mean
  ΔW = (1/T)·Σᵢ wᵢ ΔWᵢ over the T sources (the paper averages the weights it does not regress).
  The report marks these modules with ``fallback_mean = 1``.

A singular Σⱼ G̃ⱼ (an input channel no token ever used) gets a ridge of 1e-8 of its mean diagonal,
which sets the update of those channels to zero.
"""

from __future__ import annotations

import torch

from loramerge.errors import InvalidParameter
from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs, Param, unit_interval
from loramerge.merge.methods.linear import concatenate

RIDGE = 1e-8


def shrink_off_diagonal(gram: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """G̃ = a·G + (1 − a)·diag(G).

    Example:
        >>> shrink_off_diagonal(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), 0.5).tolist()
        [[2.0, 0.5], [0.5, 4.0]]
    """
    if off_diagonal == 1.0:
        return gram
    return gram * off_diagonal + torch.diag_embed(torch.diagonal(gram)) * (1.0 - off_diagonal)


def solve_right(numerators: list[torch.Tensor], total: torch.Tensor) -> list[torch.Tensor]:
    """Each ``N`` times ``total⁻¹`` (``total`` symmetric positive semi-definite), through one Cholesky.

    Example:
        >>> S = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> [round(v, 12) for v in solve_right([torch.tensor([[2.0, 4.0]], dtype=torch.float64)], S)[0][0].tolist()]
        [1.0, 1.0]
    """
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        ridge = RIDGE * float(torch.diagonal(total).mean().clamp_min(torch.finfo(total.dtype).tiny))
        eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
        factor, info = torch.linalg.cholesky_ex(total + ridge * eye)
        if int(info) != 0:
            raise InvalidParameter("the summed Gram matrix is not positive semi-definite; the statistics are corrupt")
    stacked = torch.cat(numerators, dim=0)
    # X S⁻¹ = (S⁻¹ Xᵀ)ᵀ for a symmetric S.
    solved = torch.cholesky_solve(stacked.T, factor).T
    return list(torch.split(solved, [n.shape[0] for n in numerators], dim=0))


def regmean(inputs: ModuleInputs, *, off_diagonal: float) -> MethodOutput:
    """RegMean on one module (see the module docstring); exact, rank ≤ Σ rᵢ.

    Example:
        >>> from loramerge.core.adapter import LowRank
        >>> e = torch.eye(2)
        >>> a, b = LowRank(e[:1], e[:, :1]), LowRank(e[1:], e[:, 1:])          # ΔW₁ = E₁₁, ΔW₂ = E₂₂
        >>> grams = [torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 1.0]))]
        >>> out = regmean(ModuleInputs("fc", [a, b], [1.0, 1.0], statistics=grams), off_diagonal=1.0)
        >>> [[round(v, 4) for v in row] for row in out.delta.product().tolist()]
        [[0.75, 0.0], [0.0, 0.5]]
    """
    template = inputs.template
    if template.kind != "linear":
        summed = concatenate(ModuleInputs(inputs.module, inputs.terms, [w / len(inputs.terms) for w in inputs.weights],
                                          inputs.seed))
        return MethodOutput(summed, {"fallback_mean": 1.0})
    grams = list(inputs.statistics or [])
    if len(grams) != len(inputs.terms) or any(g is None for g in grams):
        missing = [i + 1 for i, g in enumerate(grams) if g is None] or list(range(1, len(inputs.terms) + 1))
        raise InvalidParameter(f"module {inputs.module}: no input statistics for source(s) "
                               f"{', '.join(map(str, missing))}; regmean needs every source's Gram of every module")
    n = template.matrix_shape[1]
    shrunk = []
    for i, gram in enumerate(grams):
        assert gram is not None
        if tuple(gram.shape) != (n, n):
            raise InvalidParameter(f"module {inputs.module}: source {i + 1}'s Gram is {tuple(gram.shape)}, but the "
                                   f"module takes {n} inputs")
        shrunk.append(shrink_off_diagonal(gram.to(torch.float64), off_diagonal))
    total = torch.stack(shrunk).sum(0)
    parts = [(index, term, weight) for index, (term, weight) in enumerate(zip(inputs.terms, inputs.weights))
             if term is not None and weight * term.scale != 0.0]
    if not parts:
        return MethodOutput(concatenate(inputs))
    numerators = [term.matrices(torch.float64)[1] @ shrunk[index] for index, term, _ in parts]
    solved = solve_right(numerators, total)
    B = torch.cat([term.matrices(torch.float64)[0] * (weight * term.scale) for _, term, weight in parts], dim=1)
    A = torch.cat(solved, dim=0)
    dtype, device = template.dtype, template.A.device
    return MethodOutput(template.from_matrices(B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype)),
                        {"fallback_mean": 0.0})


OFF_DIAGONAL = Param("off_diagonal", 0.9, float,
                     "RegMean: scale of the Grams' off-diagonal entries, in [0, 1] (the paper's α; FusionBench uses "
                     "0.95 for CLIP, 0.6 for GPT-2).", check=unit_interval(low_open=False))

REGMEAN = MergeMethod(
    name="regmean",
    function=regmean,
    summary="RegMean: per Linear layer, the update that best reproduces every source on its own data (needs data).",
    formula="ΔW = (Σ wᵢ ΔWᵢ G̃ᵢ)(Σ G̃ᵢ)⁻¹, G̃ = a·G + (1−a)·diag(G), G = mean xxᵀ of the layer's inputs",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    params=(OFF_DIAGONAL,),
    needs_statistics=True,
)

METHODS = (REGMEAN,)
