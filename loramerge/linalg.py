"""Linear algebra for re-ranking: the factored SVD of a sum of low-rank terms, dense SVDs, rank policies.

The factored SVD never forms the ``m×n`` update. For ΔW = B @ A with ``B (m×R)`` and ``A (R×n)``:

1. orthogonalise: ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (see :func:`orthogonalize`);
2. core: ``C = R_B R_Aᵀ`` (at most ``R×R``), and its SVD ``C = Ũ Σ Ṽᵀ``;
3. ``ΔW = (Q_B Ũ) Σ (Q_A Ṽ)ᵀ`` is an exact thin SVD.

Cost O((m + n)·R² + R³) time and O((m + n)·R) memory, against O(m·n·min(m, n)) for a dense SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loramerge.errors import InvalidParameter

Basis = Callable[[torch.Tensor], torch.Tensor]

# Below this eigenvalue ratio of a factor's Gram matrix (singular-value ratio 1e-5) the float64
# Gram route could lose fp32 accuracy, so the factor is orthogonalised by Householder QR instead.
GRAM_CONDITION_LIMIT = 1e-10


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


@dataclass(frozen=True)
class ThinSVD:
    """``U diag(S) Vᵀ`` with ``S`` descending, stored as small core vectors plus the bases that lift them.

    ``U = left_basis(left)`` and ``V = right_basis(right)``; :meth:`factors` lifts only the ``k``
    columns it keeps, so a truncation never pays for the directions it drops.
    """

    S: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    left_basis: Basis = _identity
    right_basis: Basis = _identity

    @property
    def U(self) -> torch.Tensor:
        return self.left_basis(self.left)

    @property
    def V(self) -> torch.Tensor:
        return self.right_basis(self.right)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-``k`` truncation as LoRA factors ``(B (m×k), A (k×n))``, with √σ on each side."""
        root = self.S[:k].clamp_min(0).sqrt()
        U = self.left_basis(self.left[:, :k])
        V = self.right_basis(self.right[:, :k])
        return U * root.to(U.dtype), (V * root.to(V.dtype)).T


def orthogonalize(X: torch.Tensor) -> tuple[torch.Tensor, Basis]:
    """``X = Q R`` with orthonormal ``Q`` (m×p) returned implicitly: ``(R (p×R), y ↦ Q @ y)``.

    A well-conditioned factor uses its float64 Gram matrix XᵀX = P Λ Pᵀ (one GEMM and an R×R
    eigendecomposition): ``R = Λ^½ Pᵀ`` and ``Q = X P Λ^-½``. Ill-conditioned or rank-deficient
    factors (e.g. the same adapter added twice) fall back to Householder QR. Both are exact
    orthogonalisations; the Gram route is about ten times faster on tall LoRA factors.
    """
    X64 = X.double()
    eigenvalues, P = torch.linalg.eigh(X64.T @ X64)
    top = float(eigenvalues[-1]) if eigenvalues.numel() else 0.0
    if top > 0.0 and float(eigenvalues[0]) > GRAM_CONDITION_LIMIT * top and X.shape[0] >= X.shape[1]:
        roots = eigenvalues.sqrt()
        lift = P / roots

        def gram_basis(y: torch.Tensor) -> torch.Tensor:
            return (X64 @ (lift @ y.double())).to(X.dtype)

        return roots[:, None] * P.T, gram_basis
    Q, R = torch.linalg.qr(X64)

    def qr_basis(y: torch.Tensor) -> torch.Tensor:
        return (Q @ y.double()).to(X.dtype)

    return R, qr_basis


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> ThinSVD:
    """Exact thin SVD of ``B @ A`` from the factors alone, without forming the product.

    Both factors are orthogonalised (:func:`orthogonalize`), the small core ``R_B R_Aᵀ`` is
    decomposed in float64, and only the singular vectors a caller keeps are lifted back.

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
    r_b, left_basis = orthogonalize(B)
    r_a, right_basis = orthogonalize(A.T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return ThinSVD(S=s.to(B.dtype), left=u_core, right=vh_core.T, left_basis=left_basis, right_basis=right_basis)


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
        return ThinSVD(S=S, left=U, right=Vh.T)
    sketch = max_rank + oversample
    gen = torch.Generator(device=delta.device).manual_seed(generator_seed)
    omega = torch.randn(n, sketch, generator=gen, device=delta.device, dtype=delta.dtype)
    Q, _ = torch.linalg.qr(delta @ omega)
    for _ in range(power_iterations):
        W, _ = torch.linalg.qr(delta.T @ Q)
        Q, _ = torch.linalg.qr(delta @ W)
    small = Q.T @ delta
    u_small, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return ThinSVD(S=S, left=Q @ u_small, right=Vh.T)


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
