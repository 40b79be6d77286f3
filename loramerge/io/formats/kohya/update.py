"""One kohya/LyCORIS module's tensors turned into a :class:`~loramerge.core.adapter.LowRank` update.

LoRA and LoCon factors are taken as they are (a Tucker ``lora_mid`` folded into A); LoHa, LoKr
and full (``diff``) modules are expanded exactly by :mod:`loramerge.io.formats.lycoris`. The
scale is ``alpha / r`` (a missing alpha means scale 1; an A1111 ``scale`` tensor overrides it;
a LoKr whose two factors are both full has no rank and scale 1). ``dora_scale`` becomes the
DoRA magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from loramerge.core.adapter import LowRank
from loramerge.errors import CorruptFile
from loramerge.io.factors import low_rank
from loramerge.io.formats import lycoris
from loramerge.io.formats.kohya.keys import check_parts, flat_shape, matrix_shape
from loramerge.io.formats.sd_names import Shape


def module_update(name: str, parts: Mapping[str, torch.Tensor], *, origin: Path | str,
                  shape_hint: Shape | None = None) -> tuple[LowRank, str]:
    """The kohya module's update as a :class:`LowRank`, and its algorithm name.

    ``shape_hint`` gives the full update shape, used to restore the kernel of LoHa/LoKr conv
    updates that store only ``(out, in·kh·kw)``.

    Example:
        >>> import torch
        >>> parts = {"lora_down.weight": torch.ones(2, 3), "lora_up.weight": torch.ones(4, 2), "alpha": torch.tensor(1.0)}
        >>> lr, algo = module_update("lora_te_x", parts, origin="f")
        >>> algo, lr.rank, lr.scale
        ('lora', 2, 0.5)
    """
    algorithm = check_parts(name, parts, origin)
    shape = flat_shape(name, parts, origin)
    shape = unflatten(shape, shape_hint)
    rank_for_alpha: int | None
    if algorithm == "lora" and "lora_mid.weight" not in parts:
        A, B = parts["lora_down.weight"], parts["lora_up.weight"]
        if A.ndim == 2 and len(shape) == 4:
            A = A.reshape(A.shape[0], *shape[1:])
            B = B.reshape(*B.shape, 1, 1)
        rank_for_alpha = int(A.shape[0])
    else:
        if algorithm == "lora":
            up, down = parts["lora_up.weight"], parts["lora_down.weight"]
            Bm, Am = lycoris.tucker(parts["lora_mid.weight"], up.reshape(up.shape[0], -1).T, down.reshape(down.shape[0], -1))
            rank_for_alpha = int(down.shape[0])
        elif algorithm == "loha":
            Bm, Am = lycoris.loha(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                                  parts.get("hada_t1"), parts.get("hada_t2"))
            rank_for_alpha = int(parts["hada_w1_b"].shape[0])
        elif algorithm == "lokr":
            Bm, Am = lycoris.lokr(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"),
                                  parts.get("lokr_w2"), parts.get("lokr_w2_a"), parts.get("lokr_w2_b"),
                                  parts.get("lokr_t2"))
            factored = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
            rank_for_alpha = int(factored.shape[0]) if factored is not None else None
        else:
            Bm, Am = lycoris.identity_factors(parts["diff"].to(torch.float64).flatten(1))
            rank_for_alpha = None
        if algorithm != "full":
            Bm, Am = lycoris.capped(Bm, Am)
        k = Am.shape[0]
        A = Am.to(torch.float32).reshape(k, *shape[1:])
        B = Bm.to(torch.float32).reshape(Bm.shape[0], k, *([1] * (len(shape) - 2)))
    alpha: float | None = float(parts["alpha"].item()) if "alpha" in parts else None
    if "scale" in parts:
        scale = float(parts["scale"].item())
    elif rank_for_alpha is None or alpha is None:
        scale = 1.0
    else:
        scale = alpha / rank_for_alpha
    if algorithm in ("full",):
        alpha = None
    magnitude, axis = _magnitude(parts.get("dora_scale"), int(shape[0]), name, origin)
    # ``diff_b`` is added as stored (ComfyUI, diffusers' Wan converter); a LowRank's bias is scaled with B.
    bias = parts.get("diff_b")
    if bias is not None and scale != 1.0:
        if scale == 0.0:
            raise CorruptFile(f"{origin}: module {name} has a diff_b bias but a zero scale")
        bias = bias.float() / scale
    update = low_rank(origin, name, A=A, B=B, scale=scale, names=("lora_down", "lora_up"), alpha=alpha,
                      magnitude=magnitude, magnitude_axis=axis, bias=bias)
    if tuple(update.delta_shape) != tuple(shape):
        raise CorruptFile(f"{origin}: module {name}: factors give shape {tuple(update.delta_shape)}, expected {tuple(shape)}")
    return update, algorithm if "lora_mid.weight" not in parts else "lora-tucker"


def unflatten(shape: Shape, hint: Shape | None) -> Shape:
    """A LoHa/LoKr conv update's full shape: ``shape`` ``(out, in·kh·kw)`` with the kernel of ``hint``.

    ``hint`` is the base weight's shape (exact) or a name table's (same kernel, maybe another
    width: a tiny test model, an inpainting ``conv_in`` with 9 input channels).

    Example:
        >>> unflatten((320, 81), (320, 4, 3, 3)), unflatten((8, 16), None)
        ((320, 9, 3, 3), (8, 16))
    """
    if len(shape) != 2 or hint is None or len(hint) <= 2:
        return tuple(shape)
    if matrix_shape(hint) == tuple(shape):
        return tuple(hint)
    kernel = tuple(int(d) for d in hint[2:])
    size = math.prod(kernel)
    if size > 1 and shape[1] % size == 0:
        return (int(shape[0]), int(shape[1]) // size, *kernel)
    return tuple(shape)


def _magnitude(dora: torch.Tensor | None, out: int, name: str,
               origin: Path | str) -> tuple[torch.Tensor | None, Literal["out", "in"]]:
    """DoRA magnitude and its axis, from how LyCORIS/kohya lay ``dora_scale`` out.

    ``(out, 1…)`` (``wd_on_output=True``) becomes PEFT's per-output ``(out,)``; ``(1, in…)``
    (``wd_on_output=False``, one norm per input channel) is kept as stored, with axis ``in``.
    """
    if dora is None:
        return None, "out"
    if dora.shape[0] == out and all(d == 1 for d in dora.shape[1:]):
        return dora.reshape(out), "out"
    if dora.ndim > 1 and dora.shape[0] == 1:
        return dora, "in"
    raise CorruptFile(f"{origin}: module {name}: dora_scale of shape {tuple(dora.shape)} fits neither DoRA axis")
