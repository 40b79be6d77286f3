"""kohya / A1111 LoRA files and LyCORIS files with the same module names: reader and writer.

**Keys.** ``<name>.lora_down.weight`` (A), ``<name>.lora_up.weight`` (B) and an optional 0-d
``<name>.alpha``, where ``<name>`` is a component prefix (``lora_unet_``, ``lora_te_``,
``lora_te1_``, ``lora_te2_``, ``lora_te3_``, ``lora_transformer_``, ``lycoris_``) followed by
the module path with its dots turned into underscores. Conv LoRAs (LoCon) have 4-D factors
``(r, in, kh, kw)`` / ``(out, r, 1, 1)``; a Tucker ``lora_mid`` is folded into A exactly.
LyCORIS LoHa, LoKr and full (``diff``) modules are expanded exactly by
:mod:`loramerge.io.formats.lycoris`; ``dora_scale`` is kept as the DoRA magnitude (fold only).

**Scale.** ``alpha / r`` with ``r = lora_down.shape[0]`` (LoHa: ``hada_w1_b.shape[0]``; LoKr:
the rank of its factorised part). A missing alpha means ``alpha = r``, i.e. scale 1 — what
kohya's trainer, A1111 and ComfyUI all do. An A1111 ``<name>.scale`` tensor overrides
``alpha / r``. A LoKr whose two Kronecker factors are both stored full has no rank and scale 1,
as in LyCORIS and ComfyUI.

**Names** are resolved by :mod:`loramerge.io.formats.sd_names` (SD 1.x, SD 2.x, SDXL, Flux.1) or,
given a base checkpoint, by :mod:`loramerge.io.formats.base_names`. Flux's fused ``qkv`` and
``linear1`` are split into diffusers' ``to_q``/``to_k``/``to_v``/``proj_mlp``. A file none of
whose names is known keeps its kohya names as opaque module names (enough to merge such files
with each other and write them back).

**Writing** stores ``lora_down``/``lora_up`` with one float32 ``alpha`` per module such that
``alpha / r`` is the module's scale (a common alpha for all modules, see
:func:`kohya_state_dict`), re-fuses Flux modules (sharing A when the parts share it, block-diagonal otherwise, with the
alpha of the fused rank), writes minimal ``ss_*`` metadata, the merge recipe as JSON under the
``loramerge`` key, and ``sshs_model_hash`` / ``sshs_legacy_hash`` computed the way kohya's
sd-scripts do, over the tensors already cast to the saved dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from loramerge._version import __version__
from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import CorruptFile, IncompatibleAdapters, UnknownFormat, UnsupportedAdapter
from loramerge.io.formats import lycoris
from loramerge.io.formats.base_names import BaseNames
from loramerge.io.formats.sd_names import (
    ARCHITECTURES,
    KOHYA_PREFIXES,
    Architecture,
    KohyaTarget,
    Piece,
    Shape,
    architectures_for_kohya,
    flatten,
    identify,
)
from loramerge.io.formats.tensorfile import (
    check_finite,
    read_safetensors_header,
    read_tensor_file,
    write_safetensors,
)

NAME = "kohya"
METADATA_KEY = "loramerge"

_COMMON = ("alpha", "scale", "dora_scale")
_LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KNOWN = frozenset((*_COMMON, *_LORA, *lycoris.LYCORIS_SUFFIXES))
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
# Where canonical components go when no table names the module.
_DEFAULT_COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                             "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
_ORIGINAL_CONTAINERS = {"model.diffusion_model.": "lora_unet_", "diffusion_model.": "lora_unet_",
                        "cond_stage_model.transformer.": "lora_te_", "cond_stage_model.": "lora_te_",
                        "conditioner.embedders.0.transformer.": "lora_te1_",
                        "conditioner.embedders.1.model.": "lora_te2_"}


# ------------------------------------------------------------------------------------------
# Detection


def is_kohya_key(key: str) -> bool:
    """True for a key with a kohya component prefix and no dots in its module name.

    Example:
        >>> is_kohya_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
        True
        >>> is_kohya_key("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")
        False
    """
    return key.startswith(KOHYA_PREFIXES) and "." in key


def header_keys(path: Path) -> list[str] | None:
    """The tensor names of a ``.safetensors`` file, or None for anything else (no tensor data is read)."""
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        header, _ = read_safetensors_header(path)
    except CorruptFile:
        return None
    return list(header)


def _kohya_keys(path: Path) -> list[str] | None:
    keys = header_keys(path)
    if not keys or not any(is_kohya_key(k) for k in keys):
        return None
    return keys


def detect(path: Path) -> bool:
    """True for a ``.safetensors`` file with kohya-named LoRA keys and no LyCORIS-only suffixes."""
    keys = _kohya_keys(path)
    return keys is not None and not any(_suffix(k) in lycoris.LYCORIS_SUFFIXES for k in keys)


def detect_lycoris(path: Path) -> bool:
    """True for a ``.safetensors`` file with kohya-named keys and LyCORIS suffixes (LoHa, LoKr, full, Tucker)."""
    keys = _kohya_keys(path)
    return keys is not None and any(_suffix(k) in lycoris.LYCORIS_SUFFIXES for k in keys)


def _suffix(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else ""


# ------------------------------------------------------------------------------------------
# Reading


def read(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None,
         source_format: str = NAME) -> Adapter:
    """Read a kohya/A1111 (or LyCORIS) LoRA file into an :class:`Adapter` with canonical module names.

    ``base`` names a checkpoint whose weight names resolve the kohya names instead of the built-in
    tables. See the module docstring for keys, scales and names.
    """
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix in _FILE_SUFFIXES]
        if len(files) != 1:
            raise UnknownFormat(f"{path}: a kohya LoRA is one .safetensors file; this folder holds {len(files)}")
        path = files[0]
    tensors, metadata = read_tensor_file(path, allow_pickle=allow_pickle)
    groups = group_keys(tensors, origin=path)
    flat = {name: _flat_shape(name, parts, path) for name, parts in groups.items()}
    base_names = BaseNames.from_path(base) if base is not None else None
    targets, architectures = resolve_names(flat, origin=path, base=base_names)
    arch = ARCHITECTURES[architectures[0]] if architectures and base_names is None else None
    base_shapes = base_names.modules if base_names is not None else {}

    layers: dict[str, LowRank] = {}
    algorithms: dict[str, str] = {}
    for name, parts in groups.items():
        target = targets[name]
        hint = _shape_hint(target, arch, base_shapes)
        update, algorithm = module_update(name, parts, origin=path, shape_hint=hint)
        if base is not None and not _fits(update.delta_shape, target.shape):
            raise IncompatibleAdapters(
                f"{path}: module {name} has an update of shape {tuple(update.delta_shape)} but the base "
                f"weight {target.pieces[0].module} is {tuple(target.shape)}"
            )
        for module, lowrank in split_update(update, target, origin=path).items():
            if module in layers:
                raise CorruptFile(f"{path}: module {module} is given twice (by {name} and another key)")
            layers[module] = lowrank
            algorithms[module] = algorithm
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point() and t.ndim > 0}
    config: dict[str, Any] = {"metadata": metadata, "algorithms": algorithms}
    if architectures:
        config["architectures"] = architectures
    return Adapter(
        layers, source_format=source_format, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        source=str(path), config=config,
    )


def read_lycoris(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None) -> Adapter:
    """:func:`read` for LyCORIS files: the same names, ``source_format='lycoris'``."""
    return read(path, allow_pickle=allow_pickle, base=base, source_format="lycoris")


def group_keys(tensors: Mapping[str, torch.Tensor], *, origin: Path | str) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors grouped by kohya module name and suffix; unknown layouts and base-dependent algorithms refused.

    Example:
        >>> import torch
        >>> g = group_keys({"lora_te_x.lora_down.weight": torch.ones(1, 2), "lora_te_x.alpha": torch.tensor(1.0)}, origin="f")
        >>> sorted(g["lora_te_x"])
        ['alpha', 'lora_down.weight']
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        if not is_kohya_key(key):
            unknown.append(key)
            continue
        module, suffix = key.split(".", 1)
        suffix = _ALIASES.get(suffix, suffix)
        if suffix in lycoris.BASE_DEPENDENT:
            raise UnsupportedAdapter(
                f"{origin}: module {module} is a LyCORIS {lycoris.BASE_DEPENDENT[suffix]} update, which depends on "
                "the base weight and is not a low-rank B@A; it cannot be read as a LoRA"
            )
        if suffix not in _KNOWN:
            unknown.append(key)
            continue
        groups.setdefault(module, {})[suffix] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UnknownFormat(f"{origin}: {len(unknown)} key(s) in no kohya/LyCORIS LoRA layout: {shown}")
    if not groups:
        raise CorruptFile(f"{origin}: no LoRA tensors found")
    return groups


def algorithm_of(parts: Mapping[str, torch.Tensor]) -> str:
    """``lora``, ``loha``, ``lokr`` or ``full``, from which tensors a module has ("" when none fits)."""
    if "lora_down.weight" in parts or "lora_up.weight" in parts:
        return "lora"
    if any(k.startswith("hada_") for k in parts):
        return "loha"
    if any(k.startswith("lokr_") for k in parts):
        return "lokr"
    if "diff" in parts:
        return "full"
    return ""


_REQUIRED = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "full": ("diff",),
}


def _check_parts(name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> str:
    algorithm = algorithm_of(parts)
    if not algorithm:
        raise CorruptFile(f"{origin}: module {name} has {', '.join(sorted(parts))} but no LoRA factors")
    missing = [k for k in _REQUIRED.get(algorithm, ()) if k not in parts]
    if algorithm == "lokr":
        if "lokr_w1" not in parts and not {"lokr_w1_a", "lokr_w1_b"} <= set(parts):
            missing.append("lokr_w1")
        if "lokr_w2" not in parts and not {"lokr_w2_a", "lokr_w2_b"} <= set(parts):
            missing.append("lokr_w2")
    if missing:
        raise CorruptFile(f"{origin}: module {name} ({algorithm}) has no {', '.join(missing)} tensor")
    for key, tensor in parts.items():
        check_finite(tensor, path=origin, what=f"module {name} {key}")
    return algorithm


def _flat_shape(name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> Shape:
    """The module's update shape as far as its tensors tell: full for LoRA/Tucker/4-D, else ``(out, in·k)``."""
    algorithm = _check_parts(name, parts, origin)
    if algorithm == "lora":
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        kernel = tuple(parts["lora_mid.weight"].shape[2:]) if "lora_mid.weight" in parts else tuple(down.shape[2:])
        return (int(up.shape[0]), int(down.shape[1]), *kernel)
    if algorithm == "loha":
        if "hada_t1" in parts:
            return (int(parts["hada_w1_a"].shape[1]), int(parts["hada_w1_b"].shape[1]), *parts["hada_t1"].shape[2:])
        return (int(parts["hada_w1_a"].shape[0]), int(parts["hada_w1_b"].shape[1]))
    if algorithm == "full":
        return tuple(int(d) for d in parts["diff"].shape)
    w1 = parts.get("lokr_w1")
    a, b = (w1.shape[0], w1.shape[1]) if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    w2 = parts.get("lokr_w2")
    if w2 is not None:
        return (int(a * w2.shape[0]), int(b * w2.shape[1]), *w2.shape[2:])
    if "lokr_t2" in parts:
        return (int(a * parts["lokr_w2_a"].shape[1]), int(b * parts["lokr_w2_b"].shape[1]), *parts["lokr_t2"].shape[2:])
    return (int(a * parts["lokr_w2_a"].shape[0]), int(b * parts["lokr_w2_b"].shape[1]))


def _matrix(shape: Shape) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def _fits(shape: Shape, target: Shape) -> bool:
    return tuple(shape) == tuple(target) or (len(shape) == 2 and _matrix(target) == tuple(shape))


def resolve_names(flat: Mapping[str, Shape], *, origin: Path | str,
                  base: BaseNames | str | Path | None = None) -> tuple[dict[str, KohyaTarget], list[str]]:
    """Each kohya module's :class:`KohyaTarget` and the architectures that fit, best first.

    With ``base`` the names are looked up among the base checkpoint's weights; otherwise in the
    built-in tables. A file none of whose names any table knows keeps its names (opaque); one
    with only some names known, or names from different architectures, is refused.

    Example:
        >>> targets, archs = resolve_names({"lora_unet_input_blocks_4_1_proj_in": (640, 640)}, origin="f")
        >>> targets["lora_unet_input_blocks_4_1_proj_in"].pieces[0].module, archs
        ('unet.down_blocks.1.attentions.0.proj_in', ['sdxl'])
    """
    names = list(flat)
    if base is not None:
        base_names = base if isinstance(base, BaseNames) else BaseNames.from_path(base)
        targets: dict[str, KohyaTarget] = {}
        unresolved = []
        for name in names:
            module = base_names.lookup(name)
            if module is None:
                unresolved.append(name)
                continue
            shape = base_names.modules[module]
            targets[name] = KohyaTarget(name, shape, (Piece(module, 0, 0, shape[0]),))
        if unresolved:
            raise UnknownFormat(
                f"{origin}: {len(unresolved)} module name(s) match no weight of the base {base_names.origin}: "
                f"{_first(unresolved)}"
            )
        return targets, identify({t.pieces[0].module: t.shape for t in targets.values()})

    found = architectures_for_kohya(names)
    unknown = [n for n in names if not found[n]]
    if len(unknown) == len(names):
        return {n: KohyaTarget(n, flat[n], (Piece(n, 0, 0, flat[n][0]),)) for n in names}, []
    if unknown:
        raise UnknownFormat(
            f"{origin}: {len(unknown)} module name(s) match no SD 1.x/SD 2.x/SDXL/Flux module: {_first(unknown)}; "
            "pass --base CHECKPOINT (base=...) to resolve names from the model's own weights"
        )
    common = set.intersection(*found.values())
    if not common:
        examples = {}
        for n in names:
            examples.setdefault(frozenset(found[n]), n)
        shown = "; ".join(f"{n} is {'/'.join(ARCHITECTURES[a].label for a in sorted(s))}" for s, n in examples.items())
        raise IncompatibleAdapters(f"{origin}: modules of different architectures in one file ({shown})")
    candidates = [a for a in ARCHITECTURES if a in common]
    exact = [a for a in candidates if all(flat[n] == ARCHITECTURES[a].kohya[n].shape for n in names)]
    fitting = [a for a in candidates if all(_fits(flat[n], ARCHITECTURES[a].kohya[n].shape) for n in names)]
    architectures = exact or fitting or candidates
    table = ARCHITECTURES[architectures[0]]
    return {n: _scaled_target(table.kohya[n], flat[n], origin) for n in names}, architectures


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


def _scaled_target(target: KohyaTarget, shape: Shape, origin: Path | str) -> KohyaTarget:
    """``target`` for a model of another width: fused pieces shrink in proportion (tiny test models)."""
    rows = int(shape[0])
    if not target.fused or rows == target.shape[0]:
        return target
    factor, rest = divmod(target.shape[0], rows)
    if rest or any(v % factor for p in target.pieces for v in (p.src, p.dst, p.size)):
        raise IncompatibleAdapters(
            f"{origin}: fused module {target.name} has {rows} output rows; its parts need a multiple of "
            f"{target.shape[0] // math.gcd(*(p.size for p in target.pieces))}"
        )
    pieces = tuple(Piece(p.module, p.src // factor, p.dst // factor, p.size // factor) for p in target.pieces)
    return KohyaTarget(target.name, (rows, *shape[1:]), pieces)


def _shape_hint(target: KohyaTarget, arch: Architecture | None, base_shapes: Mapping[str, Shape]) -> Shape | None:
    """The full (unflattened) shape of the kohya module's update when a table or the base knows it."""
    if base_shapes:
        return base_shapes.get(target.pieces[0].module)
    if arch is not None and target.name in arch.kohya:
        return arch.kohya[target.name].shape
    return None


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
    algorithm = _check_parts(name, parts, origin)
    shape = _flat_shape(name, parts, origin)
    if len(shape) == 2 and shape_hint is not None and _matrix(shape_hint) == shape:
        shape = tuple(shape_hint)
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
    magnitude = _magnitude(parts.get("dora_scale"), int(shape[0]), name, origin)
    try:
        update = LowRank(A=A, B=B, scale=scale, kind="conv" if A.ndim > 2 else "linear", alpha=alpha,
                         magnitude=magnitude, bias=parts.get("diff_b"))
    except (ValueError, UnsupportedAdapter) as exc:
        raise CorruptFile(f"{origin}: module {name}: {exc}") from None
    if tuple(update.delta_shape) != tuple(shape):
        raise CorruptFile(f"{origin}: module {name}: factors give shape {tuple(update.delta_shape)}, expected {tuple(shape)}")
    return update, algorithm if "lora_mid.weight" not in parts else "lora-tucker"


def _magnitude(dora: torch.Tensor | None, out: int, name: str, origin: Path | str) -> torch.Tensor | None:
    """DoRA magnitude: ``(out, 1…)`` becomes PEFT's per-output ``(out,)``; ``(1, in…)`` is kept as stored.

    The two shapes are the two LyCORIS conventions (norm per output row, norm per input column);
    a fold tells them apart by shape.
    """
    if dora is None:
        return None
    if dora.shape[0] == out and all(d == 1 for d in dora.shape[1:]):
        return dora.reshape(out)
    if dora.shape[0] == 1:
        return dora
    raise CorruptFile(f"{origin}: module {name}: dora_scale of shape {tuple(dora.shape)} fits neither DoRA axis")


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
        Bm = B.new_zeros(rows, B.shape[1])
        magnitude = bias = None
        if update.magnitude is not None:
            if update.magnitude.ndim != 1:
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


def choose_architecture(adapter: Adapter) -> Architecture | None:
    """The architecture whose names the writer uses: the adapter's own record, narrowed by its modules."""
    shapes = {m: tuple(lr.delta_shape) for m, lr in adapter.layers.items()}
    found = identify(shapes)
    recorded = adapter.config.get("architectures") or []
    preferred = [a for a in recorded if a in found] or found
    return ARCHITECTURES[preferred[0]] if preferred else None


def kohya_name(module: str, arch: Architecture | None) -> str:
    """The kohya module name a canonical module is written under.

    Example:
        >>> kohya_name("unet.down_blocks.0.resnets.0.conv1", ARCHITECTURES["sd1"])
        'lora_unet_down_blocks_0_resnets_0_conv1'
        >>> kohya_name("model.diffusion_model.input_blocks.1.1.proj_in", None)
        'lora_unet_input_blocks_1_1_proj_in'
    """
    if arch is not None and module in arch.preferred:
        return arch.preferred[module]
    if module.startswith(KOHYA_PREFIXES):
        return module
    for container, prefix in _ORIGINAL_CONTAINERS.items():
        if module.startswith(container):
            return prefix + flatten(module[len(container):])
    component, _, rest = module.partition(".")
    if rest and component in _DEFAULT_COMPONENT_PREFIX:
        prefixes = dict(_DEFAULT_COMPONENT_PREFIX)
        if arch is not None:
            prefixes.update(arch.te_prefixes)
        return prefixes[component] + flatten(rest)
    return "lora_unet_" + flatten(module)


def kohya_state_dict(adapter: Adapter, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """The kohya tensors of ``adapter`` (cast to ``dtype``; alphas float32) and each module's rank and alpha.

    Every module is written with one common alpha (the most frequent ``scale · r``); a module
    whose own ``scale · r`` differs has the ratio folded into its factors (√ on each side).
    ``alpha / r`` still gives each module's scale, and loaders that cannot map per-module alphas
    onto every module (diffusers loses them on SD/SDXL attention layers) still scale it right.
    """
    arch = choose_architecture(adapter)
    groups: dict[str, dict[str, LowRank]] = {}
    for module, lr in adapter.layers.items():
        if lr.bias is not None:
            raise UnsupportedAdapter(f"module {module}: a bias update cannot be written as a kohya LoRA")
        name = kohya_name(module, arch)
        groups.setdefault(name, {})[module] = lr
    updates: dict[str, LowRank] = {}
    for name, members in groups.items():
        target = arch.kohya.get(name) if arch is not None else None
        if target is not None and target.fused:
            updates[name] = fuse(name, members, target)
        elif len(members) == 1:
            updates[name] = next(iter(members.values()))
        else:
            raise IncompatibleAdapters(f"modules {', '.join(members)} would all be written as kohya module {name}")
    alpha = Counter(lr.scale * lr.rank for lr in updates.values()).most_common(1)[0][0]
    if alpha <= 0:
        alpha = float(Counter(lr.rank for lr in updates.values()).most_common(1)[0][0])
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, lr in updates.items():
        A, B = lr.A, lr.B
        ratio = lr.scale * lr.rank / alpha
        if ratio != 1.0:
            root = math.sqrt(abs(ratio))
            A, B = A * root, B * math.copysign(root, ratio)
        tensors[f"{name}.lora_down.weight"] = A.to(dtype)
        tensors[f"{name}.lora_up.weight"] = B.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if lr.magnitude is not None:
            dora = lr.magnitude if lr.magnitude.ndim > 1 else lr.magnitude.reshape(-1, *([1] * (lr.A.ndim - 1)))
            tensors[f"{name}.dora_scale"] = dora.to(dtype)
        ranks[name] = lr.rank
    return tensors, ranks, dict.fromkeys(ranks, alpha)


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


def write(adapter: Adapter, path: Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter`` as one kohya ``.safetensors`` file at ``path``."""
    tensors, ranks, alphas = kohya_state_dict(adapter, dtype)
    metadata = build_metadata(adapter, ranks, alphas, {n: tensors[f"{n}.lora_down.weight"].ndim for n in ranks})
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    write_safetensors(tensors, path, metadata)


def build_metadata(adapter: Adapter, ranks: Mapping[str, int], alphas: Mapping[str, float],
                   ndims: Mapping[str, int]) -> dict[str, str]:
    """Minimal ``ss_*`` metadata (training metadata of a single source is kept) plus the ``loramerge`` recipe."""
    arch = choose_architecture(adapter)
    source_meta = adapter.config.get("metadata") or {}
    # A converted (or resized: one source) file keeps its training metadata; hashes of the old bytes would be stale.
    one_source = adapter.report is None or len(adapter.report.sources) == 1
    metadata = {k: v for k, v in source_meta.items()
                if one_source and k.startswith(("ss_", "modelspec.")) and "hash" not in k and isinstance(v, str)}
    linear = [n for n in ranks if ndims[n] == 2]
    conv = [n for n in ranks if ndims[n] > 2]
    metadata["ss_network_module"] = arch.network_module if arch else "networks.lora"
    metadata["ss_network_dim"] = _common(ranks[n] for n in linear or conv)
    metadata["ss_network_alpha"] = _common(alphas[n] for n in linear or conv)
    args = {}
    if conv and linear:
        args = {"conv_dim": _common(ranks[n] for n in conv), "conv_alpha": _common(alphas[n] for n in conv)}
    metadata["ss_network_args"] = json.dumps(args)
    metadata["ss_v2"] = str(arch is not None and arch.name == "sd2")
    if arch is not None:
        metadata["ss_base_model_version"] = arch.base_model_version
    metadata[METADATA_KEY] = json.dumps(recipe(adapter))
    return metadata


def recipe(adapter: Adapter) -> dict[str, Any]:
    """What produced ``adapter``: the merge report's method, weights, parameters and sources, or its source file."""
    info: dict[str, Any] = {"version": __version__}
    report = adapter.report
    if report is not None:
        info.update(method=report.method, weights=report.weights, parameters=report.parameters, sources=report.sources)
    else:
        info.update(converted_from=adapter.source, source_format=adapter.source_format)
    return info


def _common(values: Iterable[float]) -> str:
    found = {float(v) for v in values}
    if len(found) != 1:
        return "Dynamic" if found else "0"
    value = found.pop()
    return str(int(value)) if value.is_integer() else f"{value:g}"


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's sd-scripts compute them.

    Both hash an in-memory safetensors serialization of ``tensors`` that carries only the
    ``ss_*`` metadata: the model hash is the SHA-256 of everything after the header, the legacy
    hash the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB.

    Example:
        >>> import hashlib, torch
        >>> model_hash, legacy = kohya_hashes({"x": torch.zeros(2)}, {"ss_network_dim": "4"})
        >>> model_hash == hashlib.sha256(bytes(8)).hexdigest(), legacy == hashlib.sha256(b"").hexdigest()[:8]
        (True, True)
    """
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=training)
    header_size = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_size:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash
