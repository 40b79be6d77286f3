"""The kohya key grammar: which files hold kohya/LyCORIS keys, and their tensors grouped by module.

A key is ``<module>.<suffix>``: ``<module>`` is a component prefix (``lora_unet_``, ``lora_te_``
…) and the flattened module path, ``<suffix>`` one of ``lora_down.weight``, ``lora_up.weight``,
``alpha``, ``scale``, ``dora_scale`` or a LyCORIS suffix (:data:`~loramerge.io.formats.lycoris.LYCORIS_SUFFIXES`).
This module checks that every module has the tensors its algorithm needs and tells the shape
of the update those tensors make.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from loramerge.errors import CorruptFile, UnknownFormat, UnsupportedAdapter
from loramerge.io.factors import check_parts as check_module_parts
from loramerge.io.formats import lycoris
from loramerge.io.formats.sd_names import KOHYA_PREFIXES, Shape
from loramerge.io.formats.tensorfile import read_safetensors_header

_COMMON = ("alpha", "scale", "dora_scale")
_LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KNOWN = frozenset((*_COMMON, *_LORA, *lycoris.LYCORIS_SUFFIXES))


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


def check_parts(name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> str:
    """The module's algorithm, after :func:`loramerge.io.factors.check_parts`: every factor present, of
    fitting shape and finite, and no mix of two algorithms."""
    return check_module_parts(name, parts, origin)


def flat_shape(name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> Shape:
    """The module's update shape as far as its tensors tell: full for LoRA/Tucker/4-D, else ``(out, in·k)``."""
    algorithm = check_parts(name, parts, origin)
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


def matrix_shape(shape: Shape) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def fits(shape: Shape, target: Shape) -> bool:
    return tuple(shape) == tuple(target) or (len(shape) == 2 and matrix_shape(target) == tuple(shape))

