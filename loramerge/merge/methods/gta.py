"""Generalized task arithmetic: the one core behind every per-entry merge.

A per-entry method is a sparsifier plus an optional sign consensus (mergekit's design). For the
weighted updates uᵢ = wᵢ·ΔWᵢ of one module (or their coefficients in an aligned space, for
KnOTS and Core Space):

    ũᵢ = sparsify(uᵢ)
    without consensus:  ΔW = λ · Σᵢ ũᵢ
    with consensus:     γ = sgn(Σᵢ ũᵢ)            ('total', TIES's "mass" rule)
                        γ = sgn(Σᵢ sgn(ũᵢ))       ('frequency')         (γ = + where the vote is 0)
                        ΔW = λ · Σᵢ [sgn(ũᵢ) = γ]·ũᵢ / max(1, Σᵢ [sgn(ũᵢ) = γ])   (disjoint mean)

The weights are applied before the vote, so a negative weight votes against its source's signs,
as task negation means. PEFT elects on the unweighted tensors and applies the weights after;
both agree when every weight is positive and equal (e.g. all 1). mergekit also elects on the
weighted tensors, but divides by Σ wᵢ over the agreeing sources rather than by their count, and
its ``dare_ties`` does not divide at all.

Two parameters select mergekit's semantics where they differ (a recipe's ``semantics: mergekit``
sets them, so a mergekit config gives the same model in both tools):

* ``divide_by`` — the disjoint mean divides by the number of agreeing sources (``count``, the
  TIES paper), by the sum of their weights (``weights``, mergekit's ``normalize: true``), or not
  at all (``none``, mergekit's ``normalize: false``, its ``dare_ties`` default);
* ``rescale`` — DARE's survivors are divided by d (``inverse``, the paper), scaled so the
  update keeps its L1 norm (``l1``, mergekit's ``rescale: true``), or left as they are
  (``none``); TIES's trim takes ``none`` (the paper) or ``l1``.

Zero entries never vote and never count as agreeing. Every sparsifier acts on one module's
tensor (or row) at a time: the TIES reference code ranks magnitudes over the whole model, which a
module-at-a-time merge cannot do (PEFT and mergekit trim per tensor too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loramerge.merge.methods import sparsify
from loramerge.merge.methods.base import MethodOutput, ModuleInputs, Param, per_source, unit_interval

MAJORITY_SIGNS = ("total", "frequency")
DIVISORS = ("count", "weights", "none")
RESCALES = ("inverse", "l1", "none")


@dataclass(frozen=True)
class EntryRecipe:
    """A per-entry method: its sparsifier (or None) and whether signs are elected."""

    sparsifier: str | None
    consensus: bool

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter names this recipe reads (besides ``lambda_``)."""
        names = {"magnitude": ("density",), "random": ("density",), "outliers": ("density", "gamma"),
                 "magprune": ("density", "epsilon")}.get(self.sparsifier or "", ())
        return names + (("majority_sign",) if self.consensus else ())


RECIPES: dict[str, EntryRecipe] = {
    "task_arithmetic": EntryRecipe(None, False),
    "ties": EntryRecipe("magnitude", True),
    "magnitude_prune": EntryRecipe("magnitude", False),
    "dare_linear": EntryRecipe("random", False),
    "dare_ties": EntryRecipe("random", True),
    "breadcrumbs": EntryRecipe("outliers", False),
    "della": EntryRecipe("magprune", True),
}


def sparsify_one(tensor: torch.Tensor, recipe: EntryRecipe, *, density: float, gamma: float, epsilon: float,
                 generator: Callable[[], torch.Generator], rescale: str = "inverse") -> torch.Tensor:
    """One update through the recipe's sparsifier (2-D ``(rows, cols)``), overwriting ``tensor``.

    ``rescale`` applies to the magnitude and random sparsifiers (see the module docstring).
    """
    if recipe.sparsifier is None:
        return tensor
    if recipe.sparsifier in ("magnitude", "random") and rescale == "l1":
        before = float(tensor.abs().sum())
        kept = sparsify_one(tensor, recipe, density=density, gamma=gamma, epsilon=epsilon, generator=generator,
                            rescale="none")
        return sparsify.match_l1(kept, before)
    if recipe.sparsifier == "magnitude":
        return sparsify.magnitude(tensor, density, inplace=True)
    if recipe.sparsifier == "random":
        kept = sparsify.random_drop(tensor, density, generator(), inplace=True)
        return kept.mul_(density) if rescale == "none" and density < 1.0 else kept
    if recipe.sparsifier == "outliers":
        return sparsify.outliers(tensor, density, gamma, inplace=True)
    if recipe.sparsifier == "magprune":
        return sparsify.magprune(tensor, density, epsilon, generator(), inplace=True)
    raise ValueError(f"unknown sparsifier {recipe.sparsifier!r}")


def merge_entries(
    terms: Iterable[tuple[int, torch.Tensor]],
    recipe: EntryRecipe,
    *,
    generator: Callable[[int], torch.Generator],
    density: Sequence[float] | float = 1.0,
    gamma: Sequence[float] | float = 0.0,
    epsilon: Sequence[float] | float = 0.0,
    majority_sign: str = "total",
    lambda_: float = 1.0,
    divide_by: str = "count",
    rescale: str = "inverse",
    weights: Sequence[float] = (),
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Sparsify, elect and fuse ``(source index, weighted update)`` pairs; ``None`` when there are none.

    The updates are consumed: they are sparsified in place, to keep one m×n buffer per source.
    Per-source parameters (and ``weights``, needed by ``divide_by="weights"``) are indexed by the
    source index. ``generator(i)`` gives source i's
    random generator. The statistics are the mean fraction of entries each sparsified update
    keeps (``density_kept``) and, with consensus, the fraction of entries where kept updates
    disagree in sign (``sign_conflicts``).

    Example:
        >>> a, b = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 3.0]])
        >>> merged, stats = merge_entries([(0, a.clone()), (1, b.clone())], RECIPES["ties"], generator=None)
        >>> merged.tolist(), stats["sign_conflicts"]
        ([[1.5, 3.0]], 0.5)
    """
    def value(param: Sequence[float] | float, index: int) -> float:
        return param[index] if isinstance(param, Sequence) else param

    kept: list[torch.Tensor] = []
    indices: list[int] = []
    fractions = []
    for index, tensor in terms:
        kept.append(sparsify_one(tensor, recipe, density=value(density, index), gamma=value(gamma, index),
                                 epsilon=value(epsilon, index), generator=lambda i=index: generator(i),
                                 rescale=rescale))
        indices.append(index)
        del tensor  # the loop variable would otherwise keep it alive while the next update is built
        if recipe.sparsifier is not None:
            fractions.append(float(torch.count_nonzero(kept[-1])) / max(1, kept[-1].numel()))
    stats: dict[str, float] = {}
    if fractions:
        stats["density_kept"] = sum(fractions) / len(fractions)
    if not kept:
        return None, stats
    if not recipe.consensus:
        merged = kept[0]
        for other in kept[1:]:
            merged += other
    else:
        agreeing_weights = [float(weights[i]) for i in indices] if divide_by == "weights" else None
        merged, stats["sign_conflicts"] = _disjoint_mean(kept, majority_sign, divide_by, agreeing_weights)
    del kept
    if lambda_ != 1.0:
        merged *= lambda_
    return merged, stats


def _disjoint_mean(kept: list[torch.Tensor], majority_sign: str, divide_by: str = "count",
                   weights: Sequence[float] | None = None) -> tuple[torch.Tensor, float]:
    # Row block by row block, writing the result into the first update's buffer: the peak memory
    # stays at the T sparsified updates plus a few block-sized buffers, whatever T is. Each source
    # is folded into running totals rather than stacked, because reductions over a stacked
    # leading dimension of size T (and the copy into the stack) cost several passes each on a CPU.
    out = kept[0]
    counter = torch.uint8 if len(kept) < 256 else torch.int32
    conflicting = 0
    for rows in sparsify.row_blocks(out, max(1, (1 << 22) // len(kept))):
        parts = [t[rows] for t in kept]
        # Summed in source order, as a reduction over the stacked updates would be.
        vote = parts[0].clone() if majority_sign == "total" else torch.sign(parts[0])
        for part in parts[1:]:
            vote += part if majority_sign == "total" else torch.sign(part)
        elected = (vote >= 0).to(vote.dtype).mul_(2.0).sub_(1.0)  # a zero vote elects +
        del vote
        total = torch.zeros_like(elected)
        count = torch.zeros(elected.shape, dtype=counter, device=elected.device)
        weight_sum = torch.zeros_like(elected) if weights is not None else None
        # An entry holding a value that opposes the vote holds values of both signs (the vote
        # follows the only sign present otherwise): these are the entries whose signs conflict.
        conflict = torch.zeros(elected.shape, dtype=torch.bool, device=elected.device)
        # Temporaries are reused across sources (fresh block-sized buffers cost page faults).
        aligned, flags = torch.empty_like(elected), torch.empty_like(conflict)
        for source, part in enumerate(parts):
            torch.mul(part, elected, out=aligned)  # > 0 where the update agrees with the elected sign, < 0 where it opposes it
            count += torch.gt(aligned, 0, out=flags)
            if weight_sum is not None and weights is not None:
                weight_sum += flags.to(weight_sum.dtype) * weights[source]
            conflict |= torch.lt(aligned, 0, out=flags)
            total += aligned.clamp_min_(0.0)
        conflicting += int(torch.count_nonzero(conflict))
        total.mul_(elected)
        if divide_by == "count":
            total.div_(count.clamp_min_(1))
        elif weight_sum is not None:  # mergekit's normalize: Σ wᵢ over the agreeing sources, 0 → 1
            total.div_(torch.where(weight_sum == 0, torch.ones_like(weight_sum), weight_sum))
        out[rows] = total
    return out, conflicting / max(1, out.numel())


def run_entry_method(inputs: ModuleInputs, recipe: EntryRecipe, **params: Any) -> MethodOutput:
    """A per-entry method on one module: dense weighted updates in, dense merged update out.

    The dense updates are built one source at a time as the core consumes them.
    """
    terms = ((index, B @ A) for index, B, A in inputs.weighted_factors())
    merged, stats = merge_entries(terms, recipe, generator=inputs.generator, weights=inputs.weights, **params)
    if merged is None:
        template = inputs.template
        B0, _ = template.matrices(template.dtype)
        merged = torch.zeros(template.matrix_shape, dtype=template.dtype, device=B0.device)
    return MethodOutput(merged, stats)


# Shared parameter definitions: the same name means the same thing in every method.
def density_param(default: float) -> Param:
    return Param("density", default, float, "Fraction of entries each source keeps, in (0, 1]; one value or one per source.",
                 check=unit_interval(), per_source=True)


def gamma_param(default: float) -> Param:
    return Param("gamma", default, float, "Breadcrumbs: fraction of largest-magnitude entries removed per row, in [0, 1); "
                 "one value or one per source.", check=_half_open_unit, per_source=True)


def epsilon_param(default: float) -> Param:
    return Param("epsilon", default, float, "DELLA: keep probabilities span density ± epsilon by magnitude rank; "
                 "one value or one per source.", check=_half_open_unit, per_source=True)


LAMBDA = Param("lambda_", 1.0, float, "Scale applied to the merged update.", check=lambda v: _finite(v))
MAJORITY_SIGN = Param("majority_sign", "total", str, "Sign election: total (sign of the sum) or frequency "
                      "(majority of signs).", choices=MAJORITY_SIGNS)
DIVIDE_BY = Param("divide_by", "count", str, "Disjoint mean divisor: count of agreeing sources (TIES), their "
                  "weights' sum (mergekit normalize: true) or none (mergekit normalize: false).", choices=DIVISORS)


def rescale_param(default: str, choices: tuple[str, ...]) -> Param:
    return Param("rescale", default, str, "Rescale of the kept entries: inverse (1/d, DARE), l1 (keep the L1 norm, "
                 "mergekit rescale: true) or none.", choices=choices)


def check_entry_params(values: dict[str, Any]) -> str | None:
    """Cross-parameter checks: gamma + density ≤ 1 (breadcrumbs), 0 < density ± epsilon ≤ 1 (DELLA).

    Example:
        >>> check_entry_params({"density": 0.5, "gamma": 0.6})
        "parameter 'gamma' plus 'density' must be at most 1 (gamma in [0, 0.5] for density 0.5), got gamma 0.6"
    """
    density = values.get("density")
    if density is None:
        return None
    # Methods with an inner merge (KnOTS, Core Space) check only what that merge reads.
    inner = RECIPES.get(values.get("inner", ""))
    for key in ("gamma", "epsilon"):
        if key not in values or ("inner" in values and (inner is None or key not in inner.params)):
            continue
        count = max(_count(density), _count(values[key]))
        for d, other in zip(per_source(density, count), per_source(values[key], count)):
            if key == "gamma" and d + other > 1.0 + 1e-12:
                return (f"parameter 'gamma' plus 'density' must be at most 1 (gamma in [0, {1 - d:g}] "
                        f"for density {d:g}), got gamma {other:g}")
            if key == "epsilon" and not (other < d and d + other <= 1.0 + 1e-12):
                return (f"parameter 'epsilon' must satisfy epsilon < density and density + epsilon ≤ 1 "
                        f"(epsilon in [0, {min(d, 1 - d):g}{')' if d <= 1 - d else ']'} for density {d:g}), "
                        f"got epsilon {other:g}")
    return None


def _count(value: Any) -> int:
    return len(value) if isinstance(value, tuple) else 1


def _half_open_unit(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def _finite(value: float) -> str | None:
    return None if value == value and abs(value) != float("inf") else "must be a finite number"
