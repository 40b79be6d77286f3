"""LoRAs named after a model's original checkpoint: ComfyUI, AI-Toolkit, DiffSynth-Studio, XLabs.

**Read.** Keys are ``<module>.<suffix>`` where ``<module>`` is the module path in the family's
original (non-diffusers) checkpoint, usually behind ``diffusion_model.`` (ComfyUI, AI-Toolkit,
musubi-tuner's ComfyUI export) and bare in DiffSynth-Studio files, and ``<suffix>`` is any of
``lora_A.weight``/``lora_B.weight`` (also with PEFT's ``.default``), ``lora_down.weight``/
``lora_up.weight``, XLabs' ``down.weight``/``up.weight``, ``alpha``, ``dora_scale``,
``lora_B.bias`` or ``diff_b`` (a bias update), or a LyCORIS suffix (LoHa, LoKr, full). The
module names are resolved by the family's own diffusers converter
(:mod:`loramerge.io.formats.converted`), or with ``base`` by the base checkpoint's weight names;
the arithmetic is the kohya reader's (:mod:`loramerge.io.formats.kohya.update`): alpha / r, or
1 without an alpha.

**Write.** One ``.safetensors`` file with ``diffusion_model.<original name>.lora_A.weight`` /
``.lora_B.weight`` (the scale baked into the factors, no alpha: what AI-Toolkit writes and
ComfyUI reads), for the families whose original names :mod:`loramerge.io.formats.original_names`
knows; diffusers modules that one original module fuses (q, k, v) are written fused.

Example:
    >>> split_key("diffusion_model.blocks.0.self_attn.q.lora_A.weight")
    ('diffusion_model.blocks.0.self_attn.q', 'lora_down.weight')
    >>> split_key("double_blocks.0.processor.qkv_lora1.up.weight")
    ('double_blocks.0.processor.qkv_lora1', 'lora_up.weight')
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter
from loramerge.errors import UnsupportedAdapter
from loramerge.io.factors import checked_tensors
from loramerge.io.formats import lycoris
from loramerge.io.formats.component import COMPONENT_KEY, denoiser_component
from loramerge.io.formats.converted import ProbeModule
from loramerge.io.formats.families import require_diffusers
from loramerge.io.formats.kohya.fused import fuse
from loramerge.io.formats.kohya.keys import flat_shape, header_keys
from loramerge.io.formats.kohya.read import assemble, single_file
from loramerge.io.formats.original_names import RULES, check_names, original_targets, writable
from loramerge.io.formats.sd_names import KOHYA_PREFIXES, flatten
from loramerge.io.formats.tensorfile import check_keys, read_tensor_file, write_safetensors

NAME = "comfyui"
CONTAINERS = ("model.diffusion_model.", "diffusion_model.")
# File suffix → the kohya suffix the update code reads.
SUFFIXES: dict[str, str] = {
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight",
    "lora_mid.weight": "lora_mid.weight", "lora_B.bias": "diff_b",
    "down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
    "alpha": "alpha", "dora_scale": "dora_scale",
    **{s: s for s in lycoris.LYCORIS_SUFFIXES if s != "lora_mid.weight"},
}
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)
# BFL's Flux control LoRAs (Canny, Depth) also replace the q/k RMSNorm scales of every attention. These
# are diffusers' names for them, as its BFL converter (_convert_bfl_flux_control_lora_to_diffusers) gives
# them; that converter itself only takes a whole Flux.1-dev file (19 + 38 blocks, every module).
_CONTROL_NORM = re.compile(r"^(?:double_blocks\.(\d+)\.(img|txt)_attn|single_blocks\.(\d+))\.norm\.(query|key)_norm\.scale$")
_DIFFUSERS_HEADS = ("transformer.", "transformer_2.", "unet.", "text_encoder", "base_model.model.")


def control_norm(key: str) -> str | None:
    """The diffusers parameter a Flux control LoRA's norm ``scale`` replaces, or None for other keys.

    Example:
        >>> control_norm("double_blocks.3.txt_attn.norm.key_norm.scale")
        'transformer.transformer_blocks.3.attn.norm_added_k.weight'
        >>> control_norm("diffusion_model.single_blocks.0.norm.query_norm.scale")
        'transformer.single_transformer_blocks.0.attn.norm_q.weight'
    """
    for container in CONTAINERS:
        key = key.removeprefix(container)
    found = _CONTROL_NORM.match(key)
    if found is None:
        return None
    double, stream, single, which = found.groups()
    block = f"transformer_blocks.{double}" if double is not None else f"single_transformer_blocks.{single}"
    return f"transformer.{block}.attn.norm_{'added_' if stream == 'txt' else ''}{which[0]}.weight"


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, kohya suffix)`` of a key in any spelling this layout uses, or None."""
    for suffix in _ORDERED:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


def detect(path: Path) -> bool:
    """True for a ``.safetensors`` file whose keys are all LoRA keys on original-checkpoint module names.

    That is: behind ``diffusion_model.``, XLabs' ``.processor.`` modules, or bare names that are
    neither kohya-prefixed nor diffusers component paths (DiffSynth-Studio).
    """
    keys = [k for k in header_keys(path) or () if control_norm(k) is None]
    if not keys or any(k.startswith(KOHYA_PREFIXES) or k.startswith(_DIFFUSERS_HEADS) for k in keys):
        return False
    split = [split_key(k) for k in keys]
    if any(s is None for s in split):
        return False
    if any(k.startswith(CONTAINERS) or ".processor." in k for k in keys):
        return True
    from loramerge.io.formats.diffusers import component_of

    # Bare names (DiffSynth-Studio): a diffusers-style file names every module by a diffusers path.
    return any(component_of(k) is None for k in keys)


def read(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None,
         skip_unknown: bool = False) -> Adapter:
    """Read a ComfyUI/AI-Toolkit/DiffSynth/XLabs LoRA into an :class:`Adapter` with diffusers module names."""
    path = single_file(path)
    if base is None:
        require_diffusers()  # the family converters name these modules
    tensors, metadata = read_tensor_file(path, allow_pickle=allow_pickle)
    tensors = checked_tensors(tensors, path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    spelled: dict[str, dict[str, str]] = {}
    unknown = []
    replaced = {}  # full tensors: a Flux control LoRA's norm scales
    for key, tensor in tensors.items():
        if (norm := control_norm(key)) is not None:
            replaced[norm] = tensor
            continue
        found = split_key(key)
        if found is None:
            unknown.append(key)
            continue
        module, suffix = found
        if suffix in lycoris.BASE_DEPENDENT:
            raise UnsupportedAdapter(f"{path}: module {module} is a LyCORIS {lycoris.BASE_DEPENDENT[suffix]} update")
        groups.setdefault(module, {})[suffix] = tensor
        spelled.setdefault(module, {})[suffix] = key
    check_keys(path, unknown, found=bool(groups), layout="LoRA")
    a_style, b_style = _dominant_style(spelled)
    # Bare original names (DiffSynth-Studio) reach the converters as ComfyUI spells them.
    bare = not any(k.startswith(CONTAINERS) or ".processor." in k for k in tensors)
    lead = CONTAINERS[1] if bare else ""
    probes = {}
    for name, parts in groups.items():
        keys = spelled[name]
        alpha = keys.get("alpha")
        probes[name] = ProbeModule(
            name, flat_shape(name, parts, path),
            lead + keys.get("lora_down.weight", f"{name}.{a_style}"), lead + keys.get("lora_up.weight", f"{name}.{b_style}"),
            lead + alpha if alpha else None,
        )
    adapter = assemble(groups, tensors, metadata, path=path, base=base, probes=probes, source_format=NAME,
                       skip_unknown=skip_unknown, base_key=kohya_spelling)
    if replaced:
        adapter.full_weights = {**adapter.full_weights, **replaced}
    return adapter


def kohya_spelling(module: str) -> str:
    """The kohya spelling of an original-checkpoint module, for looking it up among a base's weights.

    Example:
        >>> kohya_spelling("diffusion_model.blocks.0.self_attn.q")
        'lora_unet_blocks_0_self_attn_q'
    """
    for container in CONTAINERS:
        if module.startswith(container):
            module = module[len(container):]
            break
    return "lora_unet_" + flatten(module)


def _dominant_style(spelled: dict[str, dict[str, str]]) -> tuple[str, str]:
    """The A/B suffixes most of the file uses (for LyCORIS modules, which have none, in the probe)."""
    for keys in spelled.values():
        if "lora_down.weight" in keys and "lora_up.weight" in keys:
            a = keys["lora_down.weight"].rsplit(".", 2 if keys["lora_down.weight"].endswith(".weight") else 1)
            b = keys["lora_up.weight"].rsplit(".", 2 if keys["lora_up.weight"].endswith(".weight") else 1)
            return ".".join(a[1:]), ".".join(b[1:])
    return "lora_A.weight", "lora_B.weight"


def write(adapter: Adapter, path: Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter`` in ComfyUI/AI-Toolkit layout: original names, ``lora_A``/``lora_B``, scale baked in.

    Diffusers modules that one original module holds (a fused ``qkv``) are written as that module:
    ``[B_q A_q; B_k A_k; B_v A_v] = blockdiag(B_q, B_k, B_v) · [A_q; A_k; A_v]``, zero rows for the parts
    the adapter does not adapt (:func:`loramerge.io.formats.kohya.fused.fuse`).
    """
    family = _family_of(adapter)
    if len({m.split(".", 1)[0] for m in adapter.layers}) > 1:
        raise UnsupportedAdapter("the ComfyUI layout holds one denoiser; write each expert (transformer, "
                                 "transformer_2) to its own file, or use --to diffusers")
    require_diffusers()  # the converter gives the fused modules' rows and checks every name
    targets = original_targets({m: tuple(lr.delta_shape) for m, lr in adapter.layers.items()}, family)
    check_names(targets, family, key_prefix="diffusion_model.", flat_names=False)
    tensors: dict[str, torch.Tensor] = {}
    for original, target in targets.items():
        members = {p.module: adapter.layers[p.module] for p in target.pieces if p.module in adapter.layers}
        for module, lr in members.items():
            if lr.magnitude is not None:
                raise UnsupportedAdapter(f"module {module}: a DoRA magnitude cannot be written in ComfyUI layout")
            if lr.bias is not None and target.fused:
                raise UnsupportedAdapter(f"module {module}: a bias update cannot be written into fused module {original}")
        update = fuse(original, members, target) if target.fused else next(iter(members.values()))
        name = "diffusion_model." + original
        baked = update.baked()
        copies = target.copies  # the converter halves lora_A: both halves hold all of A, B is shared out
        tensors[f"{name}.lora_A.weight"] = torch.cat([baked.A] * copies).to(dtype)
        tensors[f"{name}.lora_B.weight"] = torch.cat([baked.B / copies] * copies, 1).to(dtype)
        if update.bias is not None:
            tensors[f"{name}.lora_B.bias"] = update.bias.to(dtype)
    header = {"format": "pt"}
    if denoiser_component(adapter) == "transformer_2":  # the file cannot say which expert it is for
        header[COMPONENT_KEY] = "transformer_2"
    write_safetensors(tensors, path, header)


def _family_of(adapter: Adapter) -> str:
    """The family recorded when the adapter was read, else the first family its modules fit: one whose
    original names are known here, or an error (a Flux.1 adapter must not be written with Flux.2's names)."""
    from loramerge.io.formats.families import FAMILIES, families_of

    recorded = [a for a in adapter.config.get("architectures") or [] if a in FAMILIES]
    found = recorded or families_of(list(adapter.layers))
    if not found or not writable(found[0]):
        raise UnsupportedAdapter(
            f"{adapter.source or 'adapter'}: the ComfyUI layout needs a family whose original names loramerge "
            f"knows ({', '.join(sorted(RULES))}); these modules fit "
            f"{', '.join(FAMILIES[f].label for f in found) or 'none'}: use --to diffusers"
        )
    return found[0]
