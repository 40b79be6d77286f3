"""Writing an :class:`~loramerge.core.adapter.Adapter` as one kohya ``.safetensors`` file.

The file stores ``lora_down``/``lora_up`` with one float32 ``alpha`` per module such that
``alpha / r`` is the module's scale (a common alpha for all modules, see
:func:`kohya_state_dict`), re-fuses Flux modules (:mod:`.fused`) and carries the metadata and
hashes of :mod:`.metadata`.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import IncompatibleAdapters, UnsupportedAdapter
from loramerge.io.formats.families import require_diffusers
from loramerge.io.formats.kohya.fused import fuse
from loramerge.io.formats.kohya.metadata import build_metadata, kohya_hashes
from loramerge.io.formats.kohya.names import choose_architecture, kohya_name
from loramerge.io.formats.original_names import (
    check_names,
    family_for_writing,
    original_name,
    original_targets,
)
from loramerge.io.formats.sd_names import flatten
from loramerge.io.formats.tensorfile import write_safetensors


def kohya_state_dict(adapter: Adapter, dtype: torch.dtype, *, bias_key: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """The kohya tensors of ``adapter`` (cast to ``dtype``; alphas float32) and each module's rank and alpha.

    Every module is written with one common alpha (the most frequent ``scale · r``); a module
    whose own ``scale · r`` differs has the ratio folded into its factors (√ on each side).
    ``alpha / r`` still gives each module's scale, and loaders that cannot map per-module alphas
    onto every module (diffusers loses them on SD/SDXL attention layers) still scale it right.
    A bias update is written under ``bias_key`` (LyCORIS: ``diff_b``) and refused without one.
    """
    refuse_flattened_convs(adapter)
    names = writer_names(adapter)
    groups: dict[str, dict[str, LowRank]] = {}
    for module, lr in adapter.layers.items():
        if lr.bias is not None and bias_key is None:
            raise UnsupportedAdapter(f"module {module}: a bias update cannot be written as a kohya LoRA")
        groups.setdefault(names[module], {})[module] = lr
    arch = choose_architecture(adapter)
    family = None if arch is not None else family_for_writing(adapter)
    targets = arch.kohya if arch is not None else {}
    if family is not None:  # musubi-tuner names (fused as the original model fuses them), checked by diffusers
        require_diffusers()
        targets = {"lora_unet_" + flatten(n): t for n, t in original_targets(
            {m: tuple(lr.delta_shape) for m, lr in adapter.layers.items()}, family).items()}
        check_names(targets, family, key_prefix="", flat_names=True)
    updates: dict[str, LowRank] = {}
    for name, members in groups.items():
        target = targets.get(name)
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
            dora = dora_scale(lr)
            tensors[f"{name}.dora_scale"] = dora.to(dtype)
        if lr.bias is not None and bias_key is not None:
            tensors[f"{name}.{bias_key}"] = (lr.bias * lr.scale).to(dtype)
        ranks[name] = lr.rank
    return tensors, ranks, dict.fromkeys(ranks, alpha)


def write(adapter: Adapter, path: Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter`` as one kohya ``.safetensors`` file at ``path``."""
    tensors, ranks, alphas = kohya_state_dict(adapter, dtype)
    metadata = build_metadata(adapter, ranks, alphas, {n: tensors[f"{n}.lora_down.weight"].ndim for n in ranks})
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    write_safetensors(tensors, path, metadata)


def dora_scale(lr: LowRank) -> torch.Tensor:
    """``lr``'s DoRA magnitude laid out as LyCORIS/kohya store ``dora_scale``: ``(out, 1…)`` or ``(1, in…)``.

    Example:
        >>> import torch
        >>> lr = LowRank(torch.ones(1, 3), torch.ones(4, 1), magnitude=torch.ones(4))
        >>> tuple(dora_scale(lr).shape)
        (4, 1)
    """
    assert lr.magnitude is not None
    ones = [1] * (lr.A.ndim - 1)
    if lr.magnitude_axis == "in":
        return lr.magnitude.reshape(1, -1, *ones[1:])
    return lr.magnitude.reshape(-1, *ones)


def writer_names(adapter: Adapter) -> dict[str, str]:
    """The kohya module name each canonical module is written under (fused Flux parts share one).

    SD/SDXL/Flux.1 names come from the built-in tables; a family whose original checkpoint names
    loramerge knows is written with musubi-tuner's ``lora_unet_<original>``; anything else with
    the component's default prefix.
    """
    arch = choose_architecture(adapter)
    family = None if arch is not None else family_for_writing(adapter)
    if family is not None:
        return {m: "lora_unet_" + flatten(original_name(m, family)) for m in adapter.layers}
    return {m: kohya_name(m, arch) for m in adapter.layers}


def refuse_flattened_convs(adapter: Adapter) -> None:
    """Refuse LyCORIS updates whose conv kernel is unknown (stored flattened, no base or table to restore it).

    Written as a matrix, such a conv would be a LoRA that lycoris and diffusers both reject; the
    LyCORIS writer keeps them factored instead, and ``--base`` gives their kernel.
    """
    for module in adapter.config.get("flattened") or ():
        lr = adapter.layers.get(module)
        if lr is not None and lr.A.ndim == 2 and looks_like_conv(module):
            raise UnsupportedAdapter(
                f"module {module}: a LyCORIS conv update stored flattened ({lr.delta_shape[0]}x{lr.delta_shape[1]}) "
                "whose kernel nothing here knows; pass --base MODEL to restore it, or write --to lycoris"
            )


def looks_like_conv(module: str) -> bool:
    """True for module names that are convolutions in every UNet/VAE loramerge knows (``conv_in``, ``conv1``, …).

    Example:
        >>> looks_like_conv("unet.conv_in"), looks_like_conv("lora_unet_down_blocks_0_downsamplers_0_conv")
        (True, True)
        >>> looks_like_conv("unet.down_blocks.0.attentions.0.proj_in")
        False
    """
    leaf = module.replace("_", ".").split(".")
    return any(p.startswith("conv") or p == "op" for p in leaf[-2:])
