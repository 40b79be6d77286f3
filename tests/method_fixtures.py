"""Random in-memory adapters and float64 reference implementations of the merge methods.

The references are written from the papers on dense matrices, as directly as possible (stacked
tensors, full sorts, dense SVDs), so that they share no code with ``loramerge.merge.methods``.
"""

from __future__ import annotations

import math

import torch

from loramerge import Adapter, LowRank
from loramerge.merge.methods import ModuleInputs, get_method
from loramerge.merge.statistics import InputStatistics

SHAPES = {"layer.q": (24, 40), "layer.up": (56, 24), "layer.down": (24, 56)}


def random_adapter(seed: int, rank: int = 4, scale: float = 0.5, shapes: dict[str, tuple[int, int]] = SHAPES,
                   dtype: torch.dtype = torch.float32) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        name: LowRank(torch.randn(rank, n, generator=g, dtype=dtype), torch.randn(m, rank, generator=g, dtype=dtype),
                      scale=scale)
        for name, (m, n) in shapes.items()
    }
    return Adapter(layers)


def random_statistics(adapters: list[Adapter], seed: int = 0) -> InputStatistics:
    """Random positive definite input Grams for every Linear module of every adapter (for data-aware methods)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {m: lr.matrix_shape[1] for a in adapters for m, lr in a.layers.items() if lr.kind == "linear"}
    grams = []
    for _ in adapters:
        per_module = {}
        for module, n in shapes.items():
            X = torch.randn(2 * n, n, generator=g)
            per_module[module] = X.T @ X / (2 * n)
        grams.append(per_module)
    return InputStatistics(grams)


def module_inputs(adapters: list[Adapter], module: str, weights: list[float], seed: int = 0,
                  dtype: torch.dtype = torch.float64, statistics: InputStatistics | None = None) -> ModuleInputs:
    from loramerge.merge.methods import module_seed

    terms = [a.layers[module].to(dtype=dtype) if module in a.layers else None for a in adapters]
    grams = statistics.for_module(module) if statistics is not None else None
    return ModuleInputs(module=module, terms=terms, weights=weights, seed=module_seed(seed, module), statistics=grams)


def run_method(name: str, inputs: ModuleInputs, **params) -> torch.Tensor:
    """The method's own (un-truncated) result for one module, as a dense float64 matrix."""
    method = get_method(name)
    result = method.function(inputs, **method.resolve(params, sources=len(inputs.terms)))
    result = getattr(result, "delta", result)
    if isinstance(result, LowRank):
        B, A = result.matrices(torch.float64)
        return result.scale * (B @ A)
    return result.double()


def weighted_deltas(adapters: list[Adapter], module: str, weights: list[float]) -> list[torch.Tensor]:
    return [w * a.layers[module].product(torch.float64).reshape(a.layers[module].matrix_shape)
            for a, w in zip(adapters, weights) if module in a.layers and w != 0.0]


# ---- per-entry references (TIES, magnitude prune, Breadcrumbs, DELLA's rescale) -------------------

def trim_reference(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: the top ⌊d·N⌋ entries by magnitude (full sort of the flattened tensor)."""
    k = max(1, math.floor(density * t.numel()))
    order = torch.argsort(t.abs().flatten(), descending=True)
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return t * mask.reshape(t.shape)


def elect_and_mean_reference(tensors: list[torch.Tensor], majority_sign: str = "total") -> torch.Tensor:
    """TIES elect + disjoint mean on stacked tensors: mean over the entries whose sign matches the vote."""
    stacked = torch.stack(tensors)
    vote = stacked.sum(0) if majority_sign == "total" else torch.sign(stacked).sum(0)
    elected = torch.where(vote >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    count = agree.sum(0)
    total = (stacked * agree).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def ties_reference(tensors: list[torch.Tensor], density: float, majority_sign: str = "total") -> torch.Tensor:
    return elect_and_mean_reference([trim_reference(t, density) for t in tensors], majority_sign)


def breadcrumbs_reference(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per row: zero the ⌊γn⌋ largest magnitudes, keep the next ⌊dn⌋, zero the rest."""
    n = t.shape[1]
    top, keep = math.floor(gamma * n), max(1, math.floor(density * n))
    out = torch.zeros_like(t)
    for i in range(t.shape[0]):
        order = torch.argsort(t[i].abs(), descending=True)
        chosen = order[top:top + keep]
        out[i, chosen] = t[i, chosen]
    return out


def della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities: linear in the magnitude rank within each row, from d − ε to d + ε."""
    n = t.shape[1]
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1), dim=1).to(t.dtype)
    return density - epsilon + 2 * epsilon * ranks / (n - 1)


# ---- SVD-space references (dense float64 SVDs) ---------------------------------------------------

def nonzero_svd(D: torch.Tensor, rtol: float = 1e-10):
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    floor = rtol * float(S[0])
    keep = int((floor < S).sum())
    return U[:, :keep], S[:keep], Vh[:keep].T


def polar_reference(M: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def iso_c_reference(deltas: list[torch.Tensor]) -> torch.Tensor:
    U, S, V = nonzero_svd(sum(deltas))
    return S.mean() * U @ V.T


def tsv_reference(deltas: list[torch.Tensor]) -> torch.Tensor:
    m, n = deltas[0].shape
    budget = min(m, n) // len(deltas)
    Us, Ss, Vs = [], [], []
    for D in deltas:
        U, S, V = nonzero_svd(D)
        Us.append(U[:, :budget])
        Ss.append(S[:budget])
        Vs.append(V[:, :budget])
    return polar_reference(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ polar_reference(torch.cat(Vs, 1)).T


def iso_cts_reference(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    U, S, V = nonzero_svd(sum(deltas))
    rho, T = S.numel(), len(deltas)
    common = int(rho * fraction)
    per_task = round((rho - common) / T)
    common = rho - per_task * T
    Us, Ss, Vs = [U[:, :common]], [S[:common]], [V[:, :common]]
    for D in deltas:
        Ut, St, Vt = torch.linalg.svd(D - U[:, :common] @ (U[:, :common].T @ D), full_matrices=False)
        Us.append(Ut[:, :per_task])
        Ss.append(St[:per_task])
        Vs.append(Vt[:per_task].T)
    sigma = torch.cat(Ss).mean()
    return sigma * polar_reference(torch.cat(Us, 1)) @ polar_reference(torch.cat(Vs, 1)).T


def knots_reference(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """KnOTS-TIES: SVD of the column-wise concatenation, TIES on Σ Vₜᵀ, back through U."""
    n = deltas[0].shape[1]
    U, S, V = nonzero_svd(torch.cat(deltas, dim=1))
    coefficients = [S[:, None] * V[t * n:(t + 1) * n].T for t in range(len(deltas))]
    return U @ ties_reference(coefficients, density)


def core_space_reference(factors: list[tuple[torch.Tensor, torch.Tensor, float]], density: float) -> torch.Tensor:
    """Core Space with TIES: SVD bases of the stacked B's and A's, TIES on the core matrices."""
    U_B, _, _ = nonzero_svd(torch.cat([B for B, _, _ in factors], dim=1))
    _, _, V_A = nonzero_svd(torch.cat([A for _, A, _ in factors], dim=0))
    cores = [c * U_B.T @ B @ A @ V_A for B, A, c in factors]
    return U_B @ ties_reference(cores, density) @ V_A.T


def slerp_reference(u0: torch.Tensor, u1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = u0.flatten(), u1.flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * u0 + t * u1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * u0 + math.sin(t * theta) * u1) / math.sin(theta)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())
