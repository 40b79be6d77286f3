"""LyCORIS modules turned into exact ``B @ A`` factors, and the ``lycoris`` format entry.

LyCORIS files use kohya's module names with other suffixes, so :mod:`loramerge.io.formats.kohya`
reads them; this module holds the algebra. Every update becomes ``(B, A)`` with
``B @ A`` equal to the LyCORIS update as a matrix ``(out, in·kh·kw)``:

* **LoCon with Tucker** (``lora_mid``): ``A′ = mid ×₂ down``, rank r.
* **LoHa**: ``(B₁A₁) ⊙ (B₂A₂)`` has the face-splitting (row-wise Khatri–Rao) factors
  ``B[:, (i,j)] = B₁[:, i]·B₂[:, j]`` and ``A[(i,j), :] = A₁[i, :]·A₂[j, :]``: rank r₁·r₂.
* **LoKr**: ``kron(W₁, W₂)`` with ``W₁ = U₁V₁`` and ``W₂ = U₂V₂`` is
  ``kron(U₁, U₂) · kron(V₁, V₂)`` (the mixed-product rule): rank rank(W₁)·rank(W₂), where a
  full factor is written exactly as ``I·W`` or ``W·I``, whichever is narrower.
* **Full** (``diff``): the dense ΔW itself, written exactly as ``I·ΔW`` or ``ΔW·I``.

When the rank of an expansion would exceed ``min(out, in·k)``, the dense product is stored the
same exact way instead: the rank never exceeds the matrix size.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w = [torch.randn(s, generator=g) for s in ((6, 2), (2, 5), (6, 3), (3, 5))]
    >>> B, A = loha(*w)
    >>> B.shape[1], bool(torch.allclose(B @ A, ((w[0] @ w[1]) * (w[2] @ w[3])).double(), atol=1e-5))
    (6, True)
    >>> capped(B, A)[0].shape[1]  # rank 6 > min(6, 5): stored as the exact product, rank 5
    5
"""

from __future__ import annotations

import torch

# Suffixes that only LyCORIS writes (plain kohya files have lora_down/lora_up/alpha).
LYCORIS_SUFFIXES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "lora_mid.weight",
)
# LyCORIS algorithms whose update depends on the base weight: never a fixed B @ A.
BASE_DEPENDENT = {
    "oft_blocks": "OFT", "oft_diag": "OFT", "rescale": "OFT", "on_input": "(IA)³",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "w_norm": "norm", "b_norm": "norm",
}

_COMPUTE = torch.float64


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a Tucker-decomposed conv update ``einsum('ijkl,ip,jr->prkl', core, wa, wb)``.

    ``core`` is ``(r, r, kh, kw)``, ``wa`` ``(r, out)`` and ``wb`` ``(r, in)``; the result is
    ``B = waᵀ (out, r)`` and ``A (r, in·kh·kw)``. LoCon's ``lora_mid`` is this with
    ``wa = upᵀ`` and ``wb = down``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> t, a, b = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)
        >>> B, A = tucker(t, a, b)
        >>> ref = torch.einsum("ijkl,ip,jr->prkl", t.double(), a.double(), b.double()).reshape(4, -1)
        >>> bool(torch.allclose(B @ A, ref))
        True
    """
    core, wa, wb = core.to(_COMPUTE), wa.to(_COMPUTE), wb.to(_COMPUTE)
    A = torch.einsum("ijkl,jr->irkl", core, wb).reshape(core.shape[0], -1)
    return wa.T.contiguous(), A


def loha(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
         t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a LoHa update ``(w1a @ w1b) ⊙ (w2a @ w2b)`` (or its Tucker form), rank r₁·r₂.

    Without Tucker cores ``w*a`` is ``(out, r)`` and ``w*b`` ``(r, in·k)``; with cores ``t1``,
    ``t2`` ``(r, r, kh, kw)`` the factors are ``(r, out)`` and ``(r, in)``.
    """
    B1, A1 = tucker(t1, w1a, w1b) if t1 is not None else (w1a.to(_COMPUTE), w1b.to(_COMPUTE).flatten(1))
    B2, A2 = tucker(t2, w2a, w2b) if t2 is not None else (w2a.to(_COMPUTE), w2b.to(_COMPUTE).flatten(1))
    return khatri_rao(B1, A1, B2, A2)


def khatri_rao(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the elementwise product ``(B1 @ A1) ⊙ (B2 @ A2)``: rank ``r₁·r₂``.

    Example:
        >>> import torch
        >>> B, A = khatri_rao(torch.ones(2, 1), torch.ones(1, 3), 2 * torch.ones(2, 2), torch.ones(2, 3))
        >>> (B @ A).tolist()
        [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """
    out, r1, r2 = B1.shape[0], B1.shape[1], B2.shape[1]
    B = (B1[:, :, None] * B2[:, None, :]).reshape(out, r1 * r2)
    A = (A1[:, None, :] * A2[None, :, :]).reshape(r1 * r2, A1.shape[1])
    return B, A


def identity_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` written exactly as ``I @ matrix`` or ``matrix @ I``, whichever has the smaller rank.

    Example:
        >>> import torch
        >>> B, A = identity_factors(torch.arange(6.0).reshape(2, 3))
        >>> B.shape, A.shape, bool(torch.equal(B @ A, torch.arange(6.0).reshape(2, 3)))
        (torch.Size([2, 2]), torch.Size([2, 3]), True)
    """
    m, n = matrix.shape
    if m <= n:
        return torch.eye(m, dtype=matrix.dtype, device=matrix.device), matrix
    return matrix, torch.eye(n, dtype=matrix.dtype, device=matrix.device)


def lokr(w1: torch.Tensor | None, w1a: torch.Tensor | None, w1b: torch.Tensor | None,
         w2: torch.Tensor | None, w2a: torch.Tensor | None, w2b: torch.Tensor | None,
         t2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a LoKr update ``kron(W₁, W₂)`` in ``(out, in·kh·kw)`` layout.

    ``W₁`` is ``lokr_w1`` or ``w1a @ w1b``; ``W₂`` is ``lokr_w2`` (possibly 4-D), ``w2a @ w2b``,
    or the Tucker form with ``t2``. For a conv, ``W₁`` acts on the channel dimensions only, so
    ``kron(W₁, W₂)`` flattened is ``kron(W₁, W₂.reshape(c, -1))``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w1, w2a, w2b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
        >>> B, A = lokr(w1, None, None, None, w2a, w2b)
        >>> B.shape[1], bool(torch.allclose(B @ A, torch.kron(w1, w2a @ w2b).double(), atol=1e-6))
        (4, True)
    """
    U1, V1 = (w1a.to(_COMPUTE), w1b.to(_COMPUTE)) if w1 is None else identity_factors(w1.to(_COMPUTE))
    if w2 is not None:
        U2, V2 = identity_factors(w2.to(_COMPUTE).flatten(1))
    elif t2 is not None:
        U2, V2 = tucker(t2, w2a, w2b)
    else:
        U2, V2 = w2a.to(_COMPUTE), w2b.to(_COMPUTE).flatten(1)
    return torch.kron(_dense(U1), _dense(U2)), torch.kron(_dense(V1), _dense(V2))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides even on size-1 dimensions.

    ``torch.kron`` views its inputs and fails on a rank-1 factor such as ``wa.T`` of shape
    ``(out, 1)``, whose stride ``(1, out)`` ``.contiguous()`` leaves as it is.

    Example:
        >>> import torch
        >>> _dense(torch.ones(1, 4).T.contiguous()).stride()
        (1, 1)
    """
    return t.clone(memory_format=torch.contiguous_format)


def capped(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` balanced, or the exact dense product as :func:`identity_factors` when that has a smaller rank.

    Balancing rescales each rank-one term so its column of B and row of A have equal norms; the
    product is unchanged, and neither factor is tiny when stored in fp16 (a Khatri–Rao factor
    is a product of two small numbers).

    Example:
        >>> import torch
        >>> B, A = capped(torch.full((2, 1), 1e-4), torch.full((1, 3), 1e4))
        >>> round(float(B.norm() / A.norm()), 6), round(float((B @ A)[0, 0]), 6)
        (1.0, 1.0)
    """
    if B.shape[1] > min(B.shape[0], A.shape[1]):
        return identity_factors(B @ A)
    b_norm, a_norm = B.norm(dim=0), A.norm(dim=1)
    ratio = torch.where((b_norm > 0) & (a_norm > 0), (a_norm / b_norm).sqrt(), torch.ones_like(b_norm))
    return B * ratio, A / ratio[:, None]
