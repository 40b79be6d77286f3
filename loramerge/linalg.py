"""Linear algebra for re-ranking: the factored SVD of a sum of low-rank terms, dense SVDs, rank policies.

The factored SVD never forms the ``m×n`` update. For ΔW = B @ A with ``B (m×R)`` and ``A (R×n)``:

1. QR: ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``;
2. core: ``C = R_B R_Aᵀ`` (at most ``R×R``), and its SVD ``C = Ũ Σ Ṽᵀ``;
3. ``ΔW = (Q_B Ũ) Σ (Q_A Ṽ)ᵀ`` is an exact thin SVD.

Cost O((m + n)·R² + R³) time and O((m + n)·R) memory, against O(m·n·min(m, n)) for a dense SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramerge.errors import InvalidParameter


@dataclass(frozen=True)
class ThinSVD:
    """``U diag(S) Vᵀ`` with ``U (m×k)``, ``S (k,)`` descending, ``V (n×k)``."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-``k`` truncation as LoRA factors ``(B (m×k), A (k×n))``, with √σ on each side."""
        root = self.S[:k].clamp_min(0).sqrt()
        return self.U[:, :k] * root, (self.V[:, :k] * root).T


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> ThinSVD:
    """Exact thin SVD of ``B @ A`` from the factors alone, without forming the product.

    The small core is decomposed in float64; the tall QR factors stay in the input dtype.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> B, A = torch.randn(50, 6, generator=g), torch.randn(6, 40, generator=g)
        >>> svd = factored_svd(B, A)
        >>> dense = torch.linalg.svdvals(B @ A)[:6]
        >>> bool(torch.allclose(svd.S, dense, rtol=1e-4))
        True
    """
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"inner dimensions differ: B {tuple(B.shape)}, A {tuple(A.shape)}")
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    core = r_b.double() @ r_a.double().T
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    U = q_b @ u_core.to(B.dtype)
    V = q_a @ vh_core.T.to(A.dtype)
    return ThinSVD(U=U, S=s.to(B.dtype), V=V)


def dense_svd(delta: torch.Tensor, *, max_rank: int | None = None, oversample: int = 10,
              power_iterations: int = 4, generator_seed: int = 0) -> ThinSVD:
    """Thin SVD of a dense matrix: exact, or randomized when only ``max_rank`` ≪ min(m, n) values are needed.

    The randomized path (Halko, Martinsson & Tropp 2011) uses ``oversample`` extra columns and
    ``power_iterations`` subspace iterations with re-orthonormalisation, which keeps the leading
    singular values accurate even when the spectrum decays slowly (sparsified deltas). Callers
    must measure the achieved error; this function does not promise it.

    Example:
        >>> import torch
        >>> d = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
        >>> svd = dense_svd(d)
        >>> bool(torch.allclose((svd.U * svd.S) @ svd.V.T, d, atol=1e-4))
        True
    """
    m, n = delta.shape
    full = min(m, n)
    if max_rank is None or max_rank + oversample >= full // 2:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return ThinSVD(U=U, S=S, V=Vh.T)
    sketch = max_rank + oversample
    gen = torch.Generator(device=delta.device).manual_seed(generator_seed)
    omega = torch.randn(n, sketch, generator=gen, device=delta.device, dtype=delta.dtype)
    Q, _ = torch.linalg.qr(delta @ omega)
    for _ in range(power_iterations):
        W, _ = torch.linalg.qr(delta.T @ Q)
        Q, _ = torch.linalg.qr(delta @ W)
    small = Q.T @ delta
    u_small, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return ThinSVD(U=Q @ u_small, S=S, V=Vh.T)


@dataclass(frozen=True)
class RankPolicy:
    """How many singular directions a module keeps.

    Exactly one of ``rank`` (a fixed rank), ``energy`` (the smallest rank keeping that fraction of
    Σσ²) or ``max_error`` (the smallest rank whose relative Frobenius error is at most that) may be
    set; ``rank_max`` caps whichever applies. An empty policy keeps everything (exact).

    Example:
        >>> import torch
        >>> RankPolicy(energy=0.85).choose(torch.tensor([3.0, 1.0, 0.1]))
        1
        >>> RankPolicy(max_error=0.01).choose(torch.tensor([3.0, 1.0, 0.1]))
        3
    """

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    rank_max: int | None = None

    def __post_init__(self) -> None:
        chosen = [n for n in ("rank", "energy", "max_error") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise InvalidParameter(f"choose one rank policy, not {' and '.join(chosen)}")
        if self.rank is not None and self.rank < 1:
            raise InvalidParameter(f"rank must be at least 1, got {self.rank}")
        if self.rank_max is not None and self.rank_max < 1:
            raise InvalidParameter(f"rank_max must be at least 1, got {self.rank_max}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise InvalidParameter(f"energy must be in (0, 1], got {self.energy}")
        if self.max_error is not None and not 0.0 <= self.max_error < 1.0:
            raise InvalidParameter(f"max_error must be in [0, 1), got {self.max_error}")

    @property
    def is_exact(self) -> bool:
        """True when nothing is truncated (no policy at all)."""
        return self.rank is None and self.energy is None and self.max_error is None and self.rank_max is None

    def with_default_rank(self, rank: int) -> RankPolicy:
        """This policy, or a fixed ``rank`` when no rank, energy or error target was given."""
        if self.rank is None and self.energy is None and self.max_error is None:
            return RankPolicy(rank=rank, rank_max=self.rank_max)
        return self

    def choose(self, singular_values: torch.Tensor) -> int:
        """The rank to keep for a descending spectrum. Always at least 1, at most ``len(S)``."""
        s2 = singular_values.double().square()
        available = int(s2.numel())
        total = float(s2.sum())
        if available == 0:
            return 1
        if self.rank is not None:
            k = self.rank
        elif self.energy is not None or self.max_error is not None:
            if total == 0.0:
                k = 1
            else:
                kept = torch.cumsum(s2, 0) / total
                target = self.energy if self.energy is not None else 1.0 - self.max_error**2  # type: ignore[operator]
                # A small tolerance so an exact target (energy 1.0) is not missed by rounding.
                k = int(torch.searchsorted(kept, torch.tensor(target - 1e-12, dtype=kept.dtype))) + 1
        else:
            k = available
        if self.rank_max is not None:
            k = min(k, self.rank_max)
        return max(1, min(k, available))


def spectrum_stats(singular_values: torch.Tensor, k: int) -> tuple[float, float]:
    """``(energy_kept, relative_error)`` of keeping the top ``k`` of an exact spectrum.

    Example:
        >>> import torch
        >>> spectrum_stats(torch.tensor([4.0, 3.0]), 1)
        (0.64, 0.6)
    """
    s2 = singular_values.double().square()
    total = float(s2.sum())
    if total == 0.0:
        return 1.0, 0.0
    kept = float(s2[:k].sum()) / total
    return kept, math.sqrt(max(0.0, 1.0 - kept))
