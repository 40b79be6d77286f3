"""The maths of a fold: adding planned updates to rows of a base tensor, or to the whole tensor.

What is added to each weight, in the compute dtype (PEFT's ``merge_and_unload``, see
reference/peft.md §3):

- LoRA: W ← W + w·s·B@A, transposed for GPT-2 Conv1D and embeddings, reshaped for convolutions.
- DoRA: W ← W + w·(m/‖W₀ + ΔW‖ ⊙ (W + ΔW) − W), the norm taken per output channel against the
  unmerged weight W₀ (so it needs the whole tensor).
- ``lora_bias``: b ← b + w·s·b_B. Full weights replace the tensor (w = 1) or interpolate towards it.
"""

from __future__ import annotations

import torch

from loramerge.errors import NonFiniteValues
from loramerge.fold.plan import Update, dora_axis

Factors = tuple[torch.Tensor, ...]


def prepare(update: Update, compute: torch.dtype, device: torch.device) -> Factors:
    """Device-side factors: (s·w·B, A) for LoRA/DoRA as matrices; the tensor for bias/replace.

    Example:
        >>> from loramerge.core.adapter import LowRank
        >>> lr = LowRank(torch.ones(1, 3), torch.ones(2, 1), scale=0.5)
        >>> B, A = prepare(Update("lora", "a", "fc", 2.0, lr), torch.float64, torch.device("cpu"))
        >>> B.tolist(), A.dtype
        ([[1.0], [1.0]], torch.float64)
    """
    if update.lowrank is not None:
        B, A = update.lowrank.matrices(compute, device)
        factor = update.lowrank.scale * (1.0 if update.kind == "dora" else update.weight)
        return B * factor, A
    assert update.tensor is not None
    return (update.tensor.to(device=device, dtype=compute),)


def apply_rows(block: torch.Tensor, update: Update, factors: Factors, start: int, stop: int) -> torch.Tensor:
    """Add ``update`` to ``block``, which holds rows ``start:stop`` of the tensor (in place).

    Example:
        >>> from loramerge.core.adapter import LowRank
        >>> update = Update("lora", "a", "fc", 1.0, LowRank(torch.ones(1, 2), torch.ones(4, 1)))
        >>> block = torch.zeros(2, 2)
        >>> apply_rows(block, update, prepare(update, torch.float32, block.device), 2, 4).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    if update.expert is not None:
        if start <= update.expert < stop:  # one expert's (out, in) — or (in, out) — matrix of a 3-D tensor
            B, A = factors
            matrix = block[update.expert - start]
            matrix.addmm_(A.T, B.T) if update.transposed else matrix.addmm_(B, A)
        return block
    if update.rows is None:
        return _apply_range(block, update, factors, start, stop)
    source, first, size = update.rows
    low, high = max(start, first), min(stop, first + size)
    if low < high:
        _apply_range(block[low - start:high - start], update, factors, low - first + source, high - first + source)
    return block


def _apply_range(block: torch.Tensor, update: Update, factors: Factors, start: int, stop: int) -> torch.Tensor:
    """Add rows ``start:stop`` of ``update`` to ``block`` (in place)."""
    if update.kind == "lora":
        B, A = factors
        flat = block.view(block.shape[0], -1)  # a view: addmm_ adds B@A in place, without a temporary
        if update.transposed:
            flat.addmm_(A[:, start:stop].T, B.T)
        else:
            flat.addmm_(B[start:stop], A)
        return block
    (value,) = factors
    rows = value[start:stop] if value.ndim else value
    if update.kind == "bias":
        return block.add_(rows, alpha=update.weight)
    return block.copy_(rows) if update.weight == 1.0 else block.add_(rows - block, alpha=update.weight)


def apply_whole(W: torch.Tensor, updates: list[Update], prepared: list[Factors]) -> torch.Tensor:
    """``W`` with every update applied in order: the path for DoRA, whose norms need every row."""
    original = W.clone() if any(u.kind == "dora" for u in updates) else W
    current = W
    rows = W.shape[0] if W.ndim else 1
    for update, factors in zip(updates, prepared):
        if update.kind == "dora":
            if current is original:
                current = current.clone()
            _apply_dora(current, original, update, factors)
        else:
            current = apply_rows(current if current is not original else current.clone(), update, factors, 0, rows)
            if update.kind == "replace":
                original = current.clone()  # the DoRA norms use the weight PEFT loaded
    return current


def _apply_dora(current: torch.Tensor, original: torch.Tensor, update: Update, factors: Factors) -> None:
    """Move the rows of ``current`` that ``update`` owns towards its DoRA target (in place)."""
    assert update.lowrank is not None and update.lowrank.magnitude is not None
    source, start, size = update.rows or (0, 0, current.shape[0] if current.ndim else 1)
    # DoRA on a slice of a fused weight normalises that module's own rows, as in the unfused model.
    part, base = current[start:start + size], original[start:start + size]
    delta = _lora_rows(update, factors, source, source + size, tuple(part.shape))
    magnitude = update.lowrank.magnitude
    if dora_axis(update.lowrank) == "in":
        norm_dims = tuple(d for d in range(current.ndim) if d != 1)
    else:
        norm_dims = (0,) if update.transposed else tuple(range(1, current.ndim))
        if update.rows is not None:
            magnitude = magnitude.reshape(-1)[source:source + size]
    norms = (base + delta).norm(p=2, dim=norm_dims, keepdim=True)
    magnitude = magnitude.to(device=current.device, dtype=current.dtype).reshape(norms.shape)
    target = (magnitude / norms) * (part + delta)
    current[start:start + size] = target if update.weight == 1.0 else part + update.weight * (target - part)


def _lora_rows(update: Update, factors: Factors, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``start:stop`` of the update in the base tensor's layout."""
    B, A = factors
    if update.transposed:
        return (A[:, start:stop].T @ B.T).reshape(stop - start, *shape[1:])
    return (B[start:stop] @ A).reshape(stop - start, *shape[1:])


def may_overflow(updates: list[Update], prepared: list[Factors], compute: torch.dtype) -> bool:
    """True when ``updates`` could push a finite weight to Inf in ``compute``: then every block is checked.

    The bound is ``max_i Σ_k |B_ik| · max |A|`` per LoRA update (the largest entry B@A can have)
    and ``max |value|`` for a bias or replacement, summed over the updates; folds of ordinary
    weights stay far below the dtype's range and skip the per-block check. A factor that is
    already non-finite (the weight times the scale overflowed) is refused here, naming the module.

    Example:
        >>> from loramerge.core.adapter import LowRank
        >>> update = Update("lora", "a", "fc", 1e39, LowRank(torch.ones(1, 2), torch.ones(4, 1)))
        >>> try:
        ...     may_overflow([update], [prepare(update, torch.float32, torch.device("cpu"))], torch.float32)
        ... except NonFiniteValues as e:
        ...     print(e)
        module fc of a: its weight 1e+39 times its scale 1 overflows float32
    """
    bound = 0.0
    for update, factors in zip(updates, prepared):
        if update.kind == "lora":
            B, A = factors
            if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                scale = update.lowrank.scale if update.lowrank is not None else 1.0
                raise NonFiniteValues(f"module {update.module} of {update.source}: its weight {update.weight:g} times "
                                      f"its scale {scale:g} overflows {str(compute).removeprefix('torch.')}")
            bound += float(B.abs().double().sum(dim=1).max()) * float(A.abs().double().max())
        elif update.kind == "dora":
            return True  # its norms divide: checked as a whole tensor anyway
        else:
            bound += float(factors[0].abs().double().max()) * max(1.0, abs(update.weight)) if factors[0].numel() else 0.0
    return not bound < torch.finfo(compute).max / 4


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Refuse NaN/Inf in a folded tensor (``name`` is for the message).

    Example:
        >>> check_finite(torch.tensor([float("inf")]), "fc.weight")
        Traceback (most recent call last):
        ...
        loramerge.errors.NonFiniteValues: tensor fc.weight: folding produced NaN/Inf values
    """
    # A finite sum proves every entry finite (NaN and Inf propagate); only an overflow needs the scan.
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    raise NonFiniteValues(f"tensor {name}: folding produced NaN/Inf values")
