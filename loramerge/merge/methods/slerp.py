"""Spherical interpolation of two updates: ``slerp``.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985, as used for model merging
by mergekit (``slerp``, and ``nuslerp`` on task vectors). For the two weighted updates
u₀ = w₀·ΔW₀ and u₁ = w₁·ΔW₁ of a module, flattened, with cos θ = ⟨u₀, u₁⟩ / (‖u₀‖‖u₁‖):

    ΔW = sin((1 − t)θ)/sin θ · u₀ + sin(tθ)/sin θ · u₁

falling back to (1 − t)·u₀ + t·u₁ when |cos θ| > 0.9995 or one update is zero (mergekit's
rule). The inner products come from the factors (⟨B₀A₀, B₁A₁⟩ = Σ (B₀ᵀB₁) ⊙ (A₀A₁ᵀ)) and the
result is an exact concatenation of rank r₀ + r₁. mergekit's ``slerp`` interpolates whole
weights around a base model; on LoRA updates this is the task-vector form (``nuslerp``). Task
updates are often nearly orthogonal, where SLERP(½) ≈ (u₀ + u₁)/√2: task arithmetic with
λ ≈ 0.71 (algorithms.md §2.18).
"""

from __future__ import annotations

import math

import torch

from loramerge.core.adapter import LowRank
from loramerge.merge.methods.base import MergeMethod, ModuleInputs, Param
from loramerge.merge.methods.subspace import to_lowrank, zero_update


def slerp_coefficients(inner: float, norm0: float, norm1: float, t: float) -> tuple[float, float]:
    """The coefficients (a, b) of ΔW = a·u₀ + b·u₁ for SLERP at ``t``.

    Example:
        >>> [round(c, 4) for c in slerp_coefficients(0.0, 1.0, 1.0, 0.5)]
        [0.7071, 0.7071]
    """
    if norm0 == 0.0 or norm1 == 0.0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, inner / (norm0 * norm1)))
    if abs(cos) > 0.9995:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(inputs: ModuleInputs, *, t: float) -> LowRank:
    """SLERP of the two sources' weighted updates on one module (exact, rank r₀ + r₁)."""
    pairs = {index: (B, A) for index, B, A in inputs.weighted_factors(torch.float64)}
    if not pairs:
        return zero_update(inputs)

    def dot(i: int, j: int) -> float:
        (Bi, Ai), (Bj, Aj) = pairs[i], pairs[j]
        return float(((Bi.T @ Bj) * (Ai @ Aj.T)).sum())

    norm0 = math.sqrt(max(0.0, dot(0, 0))) if 0 in pairs else 0.0
    norm1 = math.sqrt(max(0.0, dot(1, 1))) if 1 in pairs else 0.0
    inner = dot(0, 1) if len(pairs) == 2 else 0.0
    a, b = slerp_coefficients(inner, norm0, norm1, t)
    Bs, As = [], []
    for index, coefficient in ((0, a), (1, b)):
        if index in pairs and coefficient != 0.0:
            B, A = pairs[index]
            root = math.sqrt(abs(coefficient))
            Bs.append(B * math.copysign(root, coefficient))
            As.append(A * root)
    if not Bs:
        return zero_update(inputs)
    return to_lowrank(inputs, torch.cat(Bs, dim=1), torch.cat(As, dim=0))


SLERP = MergeMethod(
    name="slerp",
    function=slerp,
    summary="Spherical interpolation of two weighted updates at t (lerp when nearly parallel); exact.",
    formula="ΔW = sin((1−t)θ)/sin θ·w₀ΔW₀ + sin(tθ)/sin θ·w₁ΔW₁,  cos θ = ⟨w₀ΔW₀, w₁ΔW₁⟩/‖·‖‖·‖",
    paper="Shoemake, SIGGRAPH 1985; mergekit slerp/nuslerp",
    params=(Param("t", 0.5, float, "Interpolation position: 0 gives the first source, 1 the second.",
                  check=lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]"),),
    min_sources=2,
    max_sources=2,
)

METHODS = (SLERP,)
