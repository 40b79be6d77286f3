"""Linear algebra for re-ranking: the factored SVD of a sum of low-rank terms, dense and randomized SVDs.

The factored SVD never forms the ``m×n`` update. For ΔW = B @ A with ``B (m×R)`` and ``A (R×n)``:

1. orthogonalise: ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (see :func:`orthogonalize`);
2. core: ``C = R_B R_Aᵀ`` (at most ``R×R``), and its SVD ``C = Ũ Σ Ṽᵀ``;
3. ``ΔW = (Q_B Ũ) Σ (Q_A Ṽ)ᵀ`` is an exact thin SVD.

Cost O((m + n)·R² + R³) time and O((m + n)·R) memory, against O(m·n·min(m, n)) for a dense SVD.

Half precision: LAPACK and cuSOLVER have no float16/bfloat16 decompositions, and a bf16 spectrum
(8 mantissa bits) could not tell a direction from rounding noise, so every decomposition here
runs in float32 at least (:func:`decomposable`); factors keep their own dtype. The rank policies
that read these spectra live in :mod:`loramerge.core.rank`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

Basis = Callable[[torch.Tensor], torch.Tensor]

# Relative threshold below which a singular value counts as zero. The subspace methods compute in
# float64 from the (exact) factors, where rounding noise sits near 1e-16·σ₁, so anything below
# 1e-10·σ₁ is an artefact of rank deficiency (identical or linearly dependent sources), not signal.
RANK_RTOL = 1e-10

# Below this eigenvalue ratio of a factor's Gram matrix (singular-value ratio 1e-5) the float64
# Gram route could lose fp32 accuracy, so the factor is orthogonalised by Householder QR instead.
GRAM_CONDITION_LIMIT = 1e-10

# Up to this eigenvalue ratio of the Gram matrix (singular-value ratio 100) the basis Q = X·M is
# lifted in X's own dtype: the product's rounding then stays within a few units of X's precision,
# and float32 factors skip a float64 copy of the tall matrix (about 15 % of a re-rank's time).
NATIVE_LIFT_CONDITION = 1e-4


# Decompositions run in these dtypes; half-precision input is promoted to float32.
DECOMPOSITION_DTYPES = (torch.float32, torch.float64)


def decomposition_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a decomposition of ``dtype`` data runs in: float32/float64 as they are, float32 otherwise.

    Example:
        >>> decomposition_dtype(torch.bfloat16), decomposition_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return dtype if dtype in DECOMPOSITION_DTYPES else torch.float32


def decomposable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when a decomposition can run in its dtype, else a float32 copy on the same device."""
    return tensor if tensor.dtype in DECOMPOSITION_DTYPES else tensor.to(torch.float32)


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

    @property
    def rank(self) -> int:
        """The number of singular values held."""
        return int(self.S.numel())

    def nonzero(self, rtol: float = RANK_RTOL) -> ThinSVD:
        """Only the directions whose singular value exceeds ``rtol·σ₁`` (the numerical rank).

        Example:
            >>> import torch
            >>> svd = ThinSVD(S=torch.tensor([2.0, 1.0, 1e-14]), left=torch.eye(3), right=torch.eye(3))
            >>> svd.nonzero().S.tolist()
            [2.0, 1.0]
        """
        keep = numerical_rank(self.S, rtol)
        return replace(self, S=self.S[:keep], left=self.left[:, :keep], right=self.right[:, :keep])


def orthogonalize(X: torch.Tensor) -> tuple[torch.Tensor, Basis]:
    """``X = Q R`` with orthonormal ``Q`` (m×p) returned implicitly: ``(R (p×R), y ↦ Q @ y)``.

    A well-conditioned factor uses its float64 Gram matrix XᵀX = P Λ Pᵀ (one GEMM and an R×R
    eigendecomposition): ``R = Λ^½ Pᵀ`` and ``Q = X P Λ^-½``, lifted in X's dtype when X is
    well-conditioned (``NATIVE_LIFT_CONDITION``). Ill-conditioned or rank-deficient
    factors (e.g. the same adapter added twice) fall back to Householder QR. Both are exact
    orthogonalisations; the Gram route is about ten times faster on tall LoRA factors.
    """
    X64 = X.double()
    if X.shape[0] < X.shape[1]:  # a wide factor's Gram matrix is singular: straight to QR
        return _qr_orthogonalize(X64, X.dtype)
    eigenvalues, P = torch.linalg.eigh(X64.T @ X64)
    top = float(eigenvalues[-1]) if eigenvalues.numel() else 0.0
    bottom = float(eigenvalues[0]) if eigenvalues.numel() else 0.0
    if top > 0.0 and bottom > GRAM_CONDITION_LIMIT * top:
        roots = eigenvalues.sqrt()
        lift = P / roots
        tall = X if bottom > NATIVE_LIFT_CONDITION * top else X64
        del X64

        def gram_basis(y: torch.Tensor) -> torch.Tensor:
            return (tall @ (lift @ y.double()).to(tall.dtype)).to(X.dtype)

        return roots[:, None] * P.T, gram_basis
    return _qr_orthogonalize(X64, X.dtype)


def _qr_orthogonalize(X64: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Basis]:
    Q, R = torch.linalg.qr(X64)

    def qr_basis(y: torch.Tensor) -> torch.Tensor:
        return (Q @ y.double()).to(dtype)

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
    return ThinSVD(S=s.to(decomposition_dtype(B.dtype)), left=u_core, right=vh_core.T, left_basis=left_basis, right_basis=right_basis)


def numerical_rank(singular_values: torch.Tensor, rtol: float = RANK_RTOL, scale: float | None = None) -> int:
    """How many of these descending singular values exceed ``rtol`` times ``scale`` (default: the largest).

    Example:
        >>> import torch
        >>> numerical_rank(torch.tensor([3.0, 1e-3, 1e-12])), numerical_rank(torch.tensor([1e-12]), scale=1.0)
        (2, 0)
    """
    if singular_values.numel() == 0:
        return 0
    threshold = rtol * (float(singular_values[0]) if scale is None else scale)
    return int((singular_values > threshold).sum())


def polar_factor(M: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """The orthonormal (polar) factor ``P Qᵀ`` of ``M = P S Qᵀ``, over its non-zero spectrum only.

    For a full-column-rank ``M`` this is the nearest matrix with orthonormal columns (TSV's and
    Iso-CTS's orthogonalisation). Directions with σ ≤ ``rtol·σ₁`` are left out instead of being
    completed arbitrarily, so duplicated columns do not invent new directions.

    Example:
        >>> import torch
        >>> M = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
        >>> polar_factor(M).tolist()
        [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    """
    # M = Q·R with Q orthonormal, so polar(M) = Q·polar(R): only a small SVD, O(m·R²) in all.
    R, basis = orthogonalize(M)
    P, S, Qh = torch.linalg.svd(R.double(), full_matrices=False)
    keep = numerical_rank(S, rtol)
    return basis(P[:, :keep] @ Qh[:keep]).to(M.dtype)


def randomized_svd(delta: torch.Tensor, size: int, *, power_iterations: int = 2, seed: int = 0) -> ThinSVD:
    """An approximate thin SVD of ``delta`` with ``size`` directions (Halko, Martinsson & Tropp 2011).

    A Gaussian sketch, ``power_iterations`` rounds of subspace iteration with re-orthonormalisation,
    then the exact SVD of the small projection ``QᵀD``. The result is an orthogonal projection of
    ``delta`` onto a ``size``-dimensional subspace, so ‖D‖² − Σσᵢ² is exactly the residual energy
    of every truncation. The sketch is drawn on the CPU from ``seed`` and moved, so the same seed
    gives the same subspace on every device.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> d = torch.randn(200, 8, generator=g) @ torch.randn(8, 300, generator=g)
        >>> svd = randomized_svd(d, 12)
        >>> bool(torch.allclose(svd.S[:8], torch.linalg.svdvals(d)[:8], rtol=1e-4))
        True
    """
    delta = decomposable(delta)
    n = delta.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, size, generator=gen, dtype=delta.dtype).to(delta.device)
    Q, _ = torch.linalg.qr(delta @ omega)
    for _ in range(power_iterations):
        W, _ = torch.linalg.qr(delta.T @ Q)
        Q, _ = torch.linalg.qr(delta @ W)
    u_small, S, Vh = torch.linalg.svd(Q.T @ delta, full_matrices=False)
    return ThinSVD(S=S, left=Q @ u_small, right=Vh.T)


def dense_svd(delta: torch.Tensor, *, max_rank: int | None = None, oversample: int = 10,
              power_iterations: int = 4, generator_seed: int = 0) -> ThinSVD:
    """Thin SVD of a dense matrix: exact, or randomized when only ``max_rank`` ≪ min(m, n) values are needed.

    The randomized path (:func:`randomized_svd`) keeps ``max_rank + oversample`` directions.
    Callers must measure the achieved error; this function does not promise it.

    Example:
        >>> import torch
        >>> d = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
        >>> svd = dense_svd(d)
        >>> bool(torch.allclose((svd.U * svd.S) @ svd.V.T, d, atol=1e-4))
        True
    """
    delta = decomposable(delta)
    m, n = delta.shape
    full = min(m, n)
    if max_rank is None or max_rank + oversample >= full // 2:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return ThinSVD(S=S, left=U, right=Vh.T)
    return randomized_svd(delta, max_rank + oversample, power_iterations=power_iterations, seed=generator_seed)


def full_left_spectrum(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All left singular vectors and values of a wide ``(m, n)`` matrix (m ≤ n), descending.

    Small matrices use ``torch.linalg.svd``. From m > 1024 the eigendecomposition of the Gram
    matrix D·Dᵀ (accumulated in float64) is an order of magnitude faster than a dense SVD on a CPU
    (4096×11008: about 9 s against 108 s); its small singular values are less accurate, which only
    matters for directions a truncation drops.

    Example:
        >>> import torch
        >>> d = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
        >>> U, S = full_left_spectrum(d)
        >>> bool(torch.allclose(S, torch.linalg.svdvals(d), atol=1e-5))
        True
    """
    delta = decomposable(delta)
    if delta.shape[0] <= 1024:
        U, S, _ = torch.linalg.svd(delta, full_matrices=False)
        return U, S
    wide = delta.double()
    gram = wide @ wide.T
    del wide
    eigenvalues, vectors = torch.linalg.eigh(gram if delta.dtype == torch.float64 else gram.to(delta.dtype))
    order = torch.flip(torch.arange(eigenvalues.numel(), device=delta.device), [0])
    S = eigenvalues[order].clamp_min(0).sqrt()
    return vectors[:, order].to(delta.dtype), S.to(delta.dtype)
