"""Fused kohya modules (Flux's ``qkv`` and ``linear1``, its final ``adaLN_modulation``): split and re-fuse.

One kohya module may hold the rows of several canonical modules (a :class:`KohyaTarget` with
several pieces). Reading splits its update into those modules exactly; writing fuses them back,
sharing A when the parts share it and block-diagonally otherwise, with the alpha of the fused
rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from loramerge.core.adapter import LowRank
from loramerge.errors import IncompatibleAdapters, UnsupportedAdapter
from loramerge.io.formats.sd_names import KohyaTarget, Piece


def split_update(update: LowRank, target: KohyaTarget, *, origin: Path | str = "") -> dict[str, LowRank]:
    """The canonical modules of one kohya update: itself, or its rows cut into the fused target's parts.

    For a fused target, each part keeps only the rank columns its rows use, so kohya's
    block-diagonal ``split_qkv`` files split into rank r/3 parts; either way the split is exact.
    """
    if not target.fused:
        return {target.pieces[0].module: update}
    B, A = update.matrices(update.dtype)
    modules: dict[str, list[Piece]] = {}
    for piece in target.pieces:
        modules.setdefault(piece.module, []).append(piece)
    out: dict[str, LowRank] = {}
    for module, pieces in modules.items():
        rows = max(p.dst + p.size for p in pieces)
        if target.rows is not None:
            rows = max(rows, target.rows.get(module, rows))
        Bm = B.new_zeros(rows, B.shape[1])
        magnitude = bias = None
        if update.magnitude is not None:
            if update.magnitude_axis != "out":
                raise UnsupportedAdapter(f"{origin}: module {target.name}: an input-axis DoRA magnitude cannot be split")
            magnitude = update.magnitude.new_zeros(rows)
        if update.bias is not None:
            bias = update.bias.new_zeros(rows)
        for p in pieces:
            Bm[p.dst:p.dst + p.size] = B[p.src:p.src + p.size]
            if magnitude is not None:
                magnitude[p.dst:p.dst + p.size] = update.magnitude[p.src:p.src + p.size]
            if bias is not None:
                bias[p.dst:p.dst + p.size] = update.bias[p.src:p.src + p.size]
        used = Bm.abs().sum(0) != 0
        Am = A
        if 0 < int(used.sum()) < B.shape[1]:
            Bm, Am = Bm[:, used], A[used]
        out[module] = replace(update, A=Am.contiguous(), B=Bm.contiguous(), magnitude=magnitude, bias=bias)
    return out


# ------------------------------------------------------------------------------------------
# Writing


def fuse(name: str, members: Mapping[str, LowRank], target: KohyaTarget) -> LowRank:
    """One kohya update for the canonical parts of a fused module (absent parts are zero rows).

    Parts that share the same A (as a fused kohya file splits) fuse back at the same rank;
    others fuse block-diagonally, rank Σ rᵢ, with ``alpha = scale · Σ rᵢ`` so that
    ``alpha / rank`` still gives each part its scale.

    Example:
        >>> import torch
        >>> from loramerge.io.formats.sd_names import ARCHITECTURES
        >>> t = ARCHITECTURES["flux"].kohya["lora_unet_double_blocks_0_img_attn_qkv"]
        >>> q = LowRank(torch.ones(2, 3072), torch.ones(3072, 2), scale=0.5)
        >>> fused = fuse(t.name, {"transformer.transformer_blocks.0.attn.to_q": q}, t)
        >>> fused.delta_shape, fused.rank, fused.scale
        ((9216, 3072), 2, 0.5)
    """
    first_module, first = next(iter(members.items()))
    table_rows = max(p.dst + p.size for p in target.pieces if p.module == first_module)
    factor, rest = divmod(table_rows, first.out_features)
    if rest or factor < 1:
        raise IncompatibleAdapters(f"module {first_module}: {first.out_features} rows cannot be fused into {name}")
    pieces = [Piece(p.module, p.src // factor, p.dst // factor, p.size // factor) for p in target.pieces]
    rows = target.shape[0] // factor
    # One common scale stays in alpha; different scales are baked into each part's rows.
    common = len({lr.scale for lr in members.values()}) == 1
    scale = first.scale if common else 1.0
    coef = {m: 1.0 if common else lr.scale for m, lr in members.items()}
    mats = {m: lr.matrices(torch.float32) for m, lr in members.items()}
    shared = all(torch.equal(mats[m][1], mats[first_module][1]) for m in mats)
    if shared:
        A = mats[first_module][1]
        cols = {m: slice(0, A.shape[0]) for m in mats}
    else:
        A = torch.cat([mats[m][1] for m in mats])
        starts = [0]
        for m in mats:
            starts.append(starts[-1] + mats[m][1].shape[0])
        cols = {m: slice(starts[i], starts[i + 1]) for i, m in enumerate(mats)}
    B = A.new_zeros(rows, A.shape[0])
    magnitude = None
    if any(lr.magnitude is not None for lr in members.values()):
        if {p.module for p in pieces} != set(members) or any(lr.magnitude is None for lr in members.values()):
            raise UnsupportedAdapter(f"module {name}: a DoRA magnitude needs every part of the fused module")
        magnitude = torch.zeros(rows, dtype=torch.float32)
    for p in pieces:
        if p.module not in mats:
            continue
        B[p.src:p.src + p.size, cols[p.module]] = mats[p.module][0][p.dst:p.dst + p.size] * coef[p.module]
        if magnitude is not None:
            magnitude[p.src:p.src + p.size] = members[p.module].magnitude[p.dst:p.dst + p.size].float()
    return LowRank(A=A.contiguous(), B=B, scale=scale, magnitude=magnitude)
