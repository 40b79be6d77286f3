"""Rank policies: how many singular directions a module keeps, and the truncation of dense updates.

A policy is a fixed rank, an energy fraction, an error bound or one of kohya's dynamic
methods (a σ ratio, a σ sum), with an optional cap (:class:`RankPolicy`). Factor-space results are truncated from their factored SVD
(:func:`~loramerge.core.linalg.factored_svd`); dense updates from per-entry methods and
extraction are factored here (:func:`truncate_dense`), with the error measured, not assumed.

Every decision reads the spectrum on the host: it is at most a few thousand values, copied once
(:func:`host_spectrum`), so no host-made tensor ever meets a device tensor and no value costs
its own device synchronisation.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from loramerge.core.linalg import decomposable, full_left_spectrum, numerical_rank, randomized_svd
from loramerge.errors import InvalidParameter


def host_spectrum(singular_values: torch.Tensor) -> torch.Tensor:
    """The singular values as float64 on the CPU (one copy), where the rank decisions are made.

    Example:
        >>> host_spectrum(torch.tensor([2.0, 1.0], dtype=torch.bfloat16))
        tensor([2., 1.], dtype=torch.float64)
    """
    return singular_values.detach().to(device="cpu", dtype=torch.float64)


# The policies that choose a rank (at most one may be given), and every policy field with the cap.
TARGET_FIELDS = ("rank", "energy", "max_error", "sv_ratio", "sv_cumulative")
POLICY_FIELDS = (*TARGET_FIELDS, "rank_max")


@dataclass(frozen=True)
class RankPolicy:
    """How many singular directions a module keeps.

    At most one target may be set: ``rank`` (a fixed rank), ``energy`` (the smallest rank keeping
    that fraction of Σσ²), ``max_error`` (the smallest rank whose relative Frobenius error is at
    most that), ``sv_ratio`` R (every σ ≥ σ₁/R) or ``sv_cumulative`` F (the smallest k with
    Σᵢ≤ₖ σᵢ ≥ F·Σσ). ``rank_max`` caps whichever applies. An empty policy keeps everything (exact).

    ``sv_ratio``, ``sv_cumulative`` and ``sv_fro`` (see :meth:`from_options`) are the dynamic
    methods of kohya's ``resize_lora.py``; kohya keeps one direction more than each criterion asks
    (it adds 1 to the index), this policy keeps exactly the smallest rank that meets it.

    Example:
        >>> import torch
        >>> RankPolicy(energy=0.85).choose(torch.tensor([3.0, 1.0, 0.1]))
        1
        >>> RankPolicy(max_error=0.01).choose(torch.tensor([3.0, 1.0, 0.1]))
        3
        >>> RankPolicy(sv_ratio=4).choose(torch.tensor([4.0, 2.0, 1.0, 0.5])), RankPolicy(sv_cumulative=0.8).choose(
        ...     torch.tensor([4.0, 2.0, 1.0, 0.5]))
        (3, 2)
    """

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    rank_max: int | None = None
    sv_ratio: float | None = None
    sv_cumulative: float | None = None

    def __post_init__(self) -> None:
        chosen = [n for n in TARGET_FIELDS if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise InvalidParameter(f"choose one rank policy, not {' and '.join(chosen)}", parameter=chosen[1])
        if self.rank is not None and self.rank < 1:
            raise InvalidParameter(f"rank must be at least 1, got {self.rank}", parameter="rank")
        if self.rank_max is not None and self.rank_max < 1:
            raise InvalidParameter(f"rank_max must be at least 1, got {self.rank_max}", parameter="rank_max")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise InvalidParameter(f"energy must be in (0, 1], got {self.energy}", parameter="energy")
        if self.max_error is not None and not 0.0 <= self.max_error < 1.0:
            raise InvalidParameter(f"max_error must be in [0, 1), got {self.max_error}", parameter="max_error")
        if self.sv_ratio is not None and not (math.isfinite(self.sv_ratio) and self.sv_ratio >= 1.0):
            raise InvalidParameter(f"sv_ratio must be at least 1 (keep σ ≥ σ_max / sv_ratio), got {self.sv_ratio}",
                                   parameter="sv_ratio")
        if self.sv_cumulative is not None and not 0.0 < self.sv_cumulative <= 1.0:
            raise InvalidParameter(f"sv_cumulative must be in (0, 1], got {self.sv_cumulative}",
                                   parameter="sv_cumulative")

    @classmethod
    def from_options(cls, *, rank: int | None = None, energy: float | None = None, max_error: float | None = None,
                     sv_ratio: float | None = None, sv_cumulative: float | None = None,
                     sv_fro: float | None = None, rank_max: int | None = None) -> RankPolicy:
        """The policy the rank options describe; ``sv_fro`` F is kohya's name for ``energy`` F².

        kohya's ``sv_fro`` keeps the smallest rank whose retained Frobenius norm is at least F·‖ΔW‖_F,
        that is Σσ² kept ≥ F²·Σσ²: the ``energy`` policy with F².

        Example:
            >>> RankPolicy.from_options(sv_fro=0.9, rank_max=8)
            RankPolicy(rank=None, energy=0.81, max_error=None, rank_max=8, sv_ratio=None, sv_cumulative=None)
            >>> RankPolicy.from_options(energy=0.9, sv_fro=0.9)
            Traceback (most recent call last):
            ...
            loramerge.errors.InvalidParameter: choose one rank policy, not energy and sv_fro (sv_fro F is energy F²)
        """
        if sv_fro is not None:
            if energy is not None:
                raise InvalidParameter("choose one rank policy, not energy and sv_fro (sv_fro F is energy F²)",
                                       parameter="sv_fro")
            if not 0.0 < sv_fro <= 1.0:
                raise InvalidParameter(f"sv_fro must be in (0, 1], got {sv_fro}", parameter="sv_fro")
            energy = round(sv_fro * sv_fro, 15)
        return cls(rank=rank, energy=energy, max_error=max_error, rank_max=rank_max, sv_ratio=sv_ratio,
                   sv_cumulative=sv_cumulative)

    def as_dict(self) -> dict[str, float | int]:
        """The fields that are set, by name, in :data:`POLICY_FIELDS` order (for reports and recipes).

        Example:
            >>> RankPolicy(sv_ratio=4, rank_max=16).as_dict()
            {'sv_ratio': 4, 'rank_max': 16}
        """
        return {k: getattr(self, k) for k in POLICY_FIELDS if getattr(self, k) is not None}

    @property
    def has_target(self) -> bool:
        """True when one of the targets (rank, energy, error, σ ratio, σ sum) is set."""
        return any(getattr(self, n) is not None for n in TARGET_FIELDS)

    @property
    def is_exact(self) -> bool:
        """True when nothing is truncated (no policy at all)."""
        return not self.has_target and self.rank_max is None

    @property
    def needs_full_spectrum(self) -> bool:
        """True when the rank depends on Σσ, which a partial (randomized) spectrum cannot give."""
        return self.sv_cumulative is not None

    def with_default_rank(self, rank: int) -> RankPolicy:
        """This policy, or a fixed ``rank`` when no target was given."""
        if not self.has_target:
            return RankPolicy(rank=rank, rank_max=self.rank_max)
        return self

    def choose(self, singular_values: torch.Tensor, total_energy: float | None = None) -> int:
        """The rank to keep for a descending spectrum. Always at least 1, at most ``len(S)``.

        ``total_energy`` is ‖D‖²_F when the spectrum is partial (a randomized SVD); by default
        it is Σσ². When a partial spectrum cannot reach the target, every given direction is kept.
        ``sv_cumulative`` needs the whole spectrum (:attr:`needs_full_spectrum`).
        """
        s = host_spectrum(singular_values)
        s2 = s.square()
        available = int(s2.numel())
        total = float(s2.sum()) if total_energy is None else float(total_energy)
        if available == 0:
            return 1
        if self.rank is not None:
            k = self.rank
        elif self.sv_ratio is not None:
            k = int((s >= float(s[0]) / self.sv_ratio).sum()) if float(s[0]) > 0.0 else 1
        elif self.sv_cumulative is not None:
            k = _first_reaching(torch.cumsum(s, 0), float(s.sum()), self.sv_cumulative)
        elif self.energy is not None or self.max_error is not None:
            k = _first_reaching(torch.cumsum(s2, 0), total, self.target)
        else:
            k = available
        if self.rank_max is not None:
            k = min(k, self.rank_max)
        return max(1, min(k, available))

    @property
    def target(self) -> float:
        """The fraction of Σσ² to keep: ``energy``, or 1 − ``max_error``² (1.0 for every other policy)."""
        if self.energy is not None:
            return self.energy
        if self.max_error is not None:
            return 1.0 - self.max_error**2
        return 1.0

    def reached(self, singular_values: torch.Tensor, total_energy: float, k: int) -> bool:
        """Whether keeping ``k`` of these (possibly partial) directions meets the policy (its target or its cap).

        Example:
            >>> import torch
            >>> RankPolicy(energy=0.9).reached(torch.tensor([3.0, 1.0]), 10.0, 1)
            True
            >>> RankPolicy(energy=0.95).reached(torch.tensor([3.0, 1.0]), 12.0, 2)
            False
            >>> RankPolicy(sv_ratio=2).reached(torch.tensor([3.0, 2.0]), 13.0, 2)
            False
        """
        if self.rank is not None or (self.rank_max is not None and k >= self.rank_max):
            return True
        if self.sv_ratio is not None:
            # Met once the spectrum shows a value below the threshold (so nothing unseen is above it).
            return k < int(singular_values.numel())
        if self.sv_cumulative is not None:
            return False
        if self.energy is None and self.max_error is None:
            return True
        if total_energy == 0.0:
            return True
        kept = float(host_spectrum(singular_values[:k]).square().sum()) / total_energy
        return kept >= self.target - 1e-12


def _first_reaching(cumulative: torch.Tensor, total: float, fraction: float) -> int:
    """The smallest k whose cumulative sum reaches ``fraction`` of ``total`` (all of them if none does)."""
    if total == 0.0:
        return 1
    kept = (cumulative / total).tolist()
    # A small tolerance so an exact target (1.0) is not missed by rounding.
    return bisect.bisect_left(kept, fraction - 1e-12) + 1


@dataclass(frozen=True)
class Truncation:
    """A dense update's low-rank factors, with the energy kept and the measured relative error."""

    B: torch.Tensor
    A: torch.Tensor
    energy_kept: float
    relative_error: float


def truncate_dense(delta: torch.Tensor, policy: RankPolicy, *, seed: int = 0) -> Truncation:
    """Factor a dense ``(m, n)`` update under ``policy``, measuring the error it makes.

    A fixed rank k uses a randomized SVD with ``max(10, k/2)`` extra directions and 4 subspace
    iterations (within about 0.3 % of the optimal error on sparsified LoRA sums, where the spectrum
    decays slowly). An energy or error target grows a randomized sketch (64, 128, … directions,
    2 iterations) until the target is met or the cap is hit; past min(m, n)/6 directions the full
    spectrum is cheaper (:func:`full_left_spectrum`); ``sv_cumulative`` needs Σσ and always takes the
    full spectrum. Either way the result is the orthogonal
    projection of ``delta`` onto the kept directions, and its relative error ‖D − BA‖_F/‖D‖_F is
    computed from the factors, not inferred from singular values. An empty policy keeps the
    numerical rank (relative error ≤ 1e-6).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> d = torch.randn(300, 6, generator=g) @ torch.randn(6, 400, generator=g)
        >>> t = truncate_dense(d, RankPolicy(max_error=0.01))
        >>> t.A.shape[0], t.relative_error < 1e-5
        (6, True)
    """
    delta = decomposable(delta)
    m, n = delta.shape
    if m > n:
        t = truncate_dense(delta.T, policy, seed=seed)
        return Truncation(t.A.T, t.B.T, t.energy_kept, t.relative_error)
    total = float(torch.linalg.vector_norm(delta)) ** 2
    if total == 0.0:
        zero_b = torch.zeros(m, 1, dtype=delta.dtype, device=delta.device)
        return Truncation(zero_b, torch.zeros(1, n, dtype=delta.dtype, device=delta.device), 1.0, 0.0)
    if policy.is_exact:
        policy = RankPolicy(max_error=1e-6)
    cap = min(policy.rank_max or m, m)

    def spectrum(size: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if size >= m // 6:
            return (*full_left_spectrum(delta), True)
        svd = randomized_svd(delta, size, power_iterations=iterations, seed=seed)
        return svd.U, svd.S, False

    if policy.rank is not None:
        k = min(policy.rank, cap)
        U, S, _ = spectrum(k + max(10, k // 2), 4)
    elif policy.needs_full_spectrum:
        U, S = full_left_spectrum(delta)
        k = min(policy.choose(S), cap)
    else:
        size = min(cap, 64)
        while True:
            U, S, exact = spectrum(size, 2)
            k = min(policy.choose(S, total), cap)
            if exact or size >= cap or policy.reached(S, total, k):
                break
            size = min(cap, 2 * size)
    # Directions at rounding level carry no energy, and 1/√σ would blow up their A rows (and
    # overflow fp16/bf16 storage): keep at most the numerical rank.
    k = max(1, min(k, numerical_rank(S, 10 * torch.finfo(S.dtype).eps)))
    U = U[:, :k]
    projected = U.T @ delta
    root = S[:k].clamp_min(torch.finfo(S.dtype).tiny).sqrt().to(delta.dtype)
    residual = float(torch.linalg.vector_norm(delta - U @ projected)) ** 2
    kept = float(torch.linalg.vector_norm(projected)) ** 2 / total
    return Truncation(U * root, projected / root[:, None], min(1.0, kept), math.sqrt(min(1.0, residual / total)))


def spectrum_stats(singular_values: torch.Tensor, k: int) -> tuple[float, float]:
    """``(energy_kept, relative_error)`` of keeping the top ``k`` of an exact spectrum.

    Example:
        >>> import torch
        >>> spectrum_stats(torch.tensor([4.0, 3.0]), 1)
        (0.64, 0.6)
    """
    s2 = host_spectrum(singular_values).square()
    total = float(s2.sum())
    if total == 0.0:
        return 1.0, 0.0
    kept = float(s2[:k].sum()) / total
    return kept, math.sqrt(max(0.0, 1.0 - kept))
