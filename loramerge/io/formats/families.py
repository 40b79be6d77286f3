"""The image and video model families that diffusers loads LoRAs for, and what loramerge knows of each.

A :class:`Family` names the diffusers pipeline class whose ``lora_state_dict`` converts the
family's trainer layouts (kohya/musubi-tuner ``lora_unet_…``, ComfyUI/AI-Toolkit
``diffusion_model.…``, XLabs, BFL control, DiffSynth-Studio …) to diffusers module names, and
the diffusers model class of its denoiser. loramerge asks diffusers for both instead of keeping
its own tables:

* the module list of a family comes from its model class instantiated on the ``meta`` device
  (no memory, no download), with the default configuration (the released model's sizes);
* the name conversion of a trainer layout comes from the pipeline's own converter
  (:mod:`loramerge.io.formats.converted`).

diffusers is an optional extra (``pip install 'loramerge[diffusion]'``); :func:`require_diffusers`
says so when it is missing.

Example:
    >>> FAMILIES["wan"].label, FAMILIES["wan"].components
    ('Wan 2.1/2.2', ('transformer', 'transformer_2'))
    >>> template("transformer.blocks.12.attn1.to_q")
    'transformer.blocks.#.attn1.to_q'
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from loramerge.errors import MissingDependency

INSTALL_HINT = "pip install 'loramerge[diffusion]'"
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """One model family: its diffusers pipeline (LoRA loader) and denoiser model class.

    ``markers`` are name fragments that only this family's original (non-diffusers) layouts
    use; they order the candidates when a file's family is not known. ``configs`` are model
    configurations whose modules together cover the family's variants (Wan's image-to-video
    cross-attention, for example). ``kohya_prefix`` is the prefix its kohya-style trainers write.
    """

    name: str
    label: str
    pipeline: str
    model: str
    markers: tuple[str, ...] = ()
    configs: tuple[Mapping[str, Any], ...] = ({},)
    components: tuple[str, ...] = ("transformer",)
    base_model_version: str = ""
    converts: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flux", "Flux.1", "FluxPipeline", "FluxTransformer2DModel",
           ("double_blocks", "single_blocks", "img_attn", "txt_attn", "linear1", "qkv_lora", "proj_lora", "query_norm"),
           ({"guidance_embeds": True},), base_model_version="flux1"),
    Family("chroma", "Chroma", "ChromaPipeline", "ChromaTransformer2DModel",
           ("double_blocks", "single_blocks", "distilled_guidance_layer"), base_model_version="chroma"),
    Family("flux2", "Flux.2", "Flux2Pipeline", "Flux2Transformer2DModel",
           ("double_blocks", "single_blocks", "double_stream_modulation", "single_stream_modulation"),
           base_model_version="flux2"),
    Family("sd3", "SD3/3.5", "StableDiffusion3Pipeline", "SD3Transformer2DModel", ("joint_blocks",),
           ({}, {"num_layers": 38, "num_attention_heads": 38, "dual_attention_layers": tuple(range(13)),
                 "qk_norm": "rms_norm"}), base_model_version="sd3", converts=False),
    Family("qwen_image", "Qwen-Image", "QwenImagePipeline", "QwenImageTransformer2DModel",
           ("img_mlp", "txt_mlp", "img_mod", "txt_mod"), base_model_version="qwen_image"),
    Family("wan", "Wan 2.1/2.2", "WanPipeline", "WanTransformer3DModel",
           ("self_attn", "cross_attn", "ffn", "head.head", "time_projection", "k_img"),
           ({}, {"image_dim": 1280, "added_kv_proj_dim": 5120}), components=("transformer", "transformer_2"),
           base_model_version="wan"),
    Family("hunyuan_video", "HunyuanVideo", "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel",
           ("double_blocks", "single_blocks", "img_attn_qkv", "individual_token_refiner", "txt_in"),
           base_model_version="hunyuan_video"),
    Family("ltx_video", "LTX-Video", "LTXPipeline", "LTXVideoTransformer3DModel",
           ("transformer_blocks", "attn1", "attn2", "caption_projection"), base_model_version="ltx_video"),
    Family("ltx2", "LTX-2", "LTX2Pipeline", "LTX2VideoTransformer3DModel",
           ("audio_", "video_to_audio", "audio_to_video"), base_model_version="ltx2"),
    Family("hidream", "HiDream", "HiDreamImagePipeline", "HiDreamImageTransformer2DModel",
           ("double_stream_blocks", "single_stream_blocks"),
           ({"patch_size": 2, "caption_channels": [4096, 4096], "llama_layers": list(range(48)), "text_emb_dim": 2048,
             "num_layers": 16, "num_single_layers": 32},), base_model_version="hidream"),
    Family("lumina2", "Lumina 2", "Lumina2Pipeline", "Lumina2Transformer2DModel",
           ("noise_refiner", "context_refiner", "attention.qkv", "feed_forward"), base_model_version="lumina2"),
    Family("z_image", "Z-Image", "ZImagePipeline", "ZImageTransformer2DModel",
           ("noise_refiner", "context_refiner", "attention.to_q", "feed_forward", "adaLN_modulation"),
           base_model_version="z_image"),
    Family("cogview4", "CogView4", "CogView4Pipeline", "CogView4Transformer2DModel", (),
           base_model_version="cogview4", converts=False),
    Family("sana", "Sana", "SanaPipeline", "SanaTransformer2DModel", (), base_model_version="sana",
           converts=False),
)}

_DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)")


def template(path: str) -> str:
    """``path`` with its block numbers replaced by ``#``, so models of any depth compare equal."""
    return _DIGITS.sub("#", path)


def require_diffusers() -> Any:
    """The ``diffusers`` module, or :class:`MissingDependency` saying how to install it."""
    try:
        return importlib.import_module("diffusers")
    except ImportError:
        raise MissingDependency(
            f"reading and writing image/video model families needs diffusers: {INSTALL_HINT}"
        ) from None


def diffusers_available() -> bool:
    """True when diffusers can be imported."""
    try:
        importlib.import_module("diffusers")
    except ImportError:
        return False
    return True


def pipeline_class(family: Family) -> Any:
    """The diffusers pipeline class of ``family`` (its ``lora_state_dict`` converts trainer layouts)."""
    return getattr(require_diffusers(), family.pipeline)


def model_class(family: Family) -> Any:
    """The diffusers model class of ``family``'s denoiser."""
    return getattr(require_diffusers(), family.model)


@cache
def family_modules(name: str) -> dict[str, Shape]:
    """Every Linear/Conv module of the family's denoiser (``transformer.<path>``) with its weight shape.

    Built from the model class on the ``meta`` device with each of the family's configurations
    (the union of their modules; the first configuration's shape wins).
    """
    import torch

    family = FAMILIES[name]
    cls = model_class(family)
    out: dict[str, Shape] = {}
    for config in family.configs:
        with torch.device("meta"):
            model = cls(**config)
        for path, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and \
                    weight is not None:
                out.setdefault(f"transformer.{path}", tuple(int(d) for d in weight.shape))
    return out


@cache
def family_templates(name: str) -> frozenset[str]:
    """:func:`template` of every module of :func:`family_modules`, under each of the family's components."""
    found = set()
    for module in family_modules(name):
        rest = module.split(".", 1)[1]
        for component in FAMILIES[name].components:
            found.add(template(f"{component}.{rest}"))
    return frozenset(found)


def families_of(modules: Mapping[str, Shape] | list[str], candidates: list[str] | None = None) -> list[str]:
    """The families whose denoiser has every one of ``modules`` (diffusers names), in registry order.

    Only modules of a denoiser component (``transformer.``, ``transformer_2.``) are compared;
    ``candidates`` limits the families tried (each costs one model built on the meta device).
    """
    names = [m for m in modules if m.split(".", 1)[0] in ("transformer", "transformer_2")]
    if not names:
        return []
    wanted = {template(m) for m in names}
    out = []
    for name in candidates if candidates is not None else list(FAMILIES):
        if wanted <= family_templates(name):
            out.append(name)
    return out


def candidates_by_markers(names: list[str], converting: bool = True, hits_only: bool = False) -> list[str]:
    """Family names ordered by how many of ``names`` carry one of their markers (families without hits last,
    or left out with ``hits_only``).

    Example:
        >>> candidates_by_markers(["blocks_0_self_attn_q", "blocks_0_ffn_0"])[0]
        'wan'
    """
    scored = []
    for index, family in enumerate(FAMILIES.values()):
        if converting and not family.converts:
            continue
        hits = sum(1 for n in names if any(m in n for m in family.markers))
        if hits or not hits_only:
            scored.append((-hits, index, family.name))
    return [name for _, _, name in sorted(scored)]


# Families whose LoRAs use one naming: kohya trains Chroma with Flux.1's network and names.
COMPATIBLE = ({"flux", "chroma"},)


def family_of_class(class_name: str) -> str | None:
    """The family whose diffusers pipeline or denoiser class is ``class_name`` (a ``model_index.json`` or
    ``config.json`` ``_class_name``), or None.

    Example:
        >>> family_of_class("WanTransformer3DModel"), family_of_class("QwenImagePipeline"), family_of_class("X")
        ('wan', 'qwen_image', None)
    """
    for family in FAMILIES.values():
        if class_name in (family.pipeline, family.model):
            return family.name
    return None


def compatible(recorded: set[str], found: set[str]) -> bool:
    """True when a LoRA recorded for ``recorded`` families fits a base of the ``found`` families."""
    widened = set(found)
    for group in COMPATIBLE:
        if group & widened:
            widened |= group
    return bool(recorded & widened)


def architectures_of(shapes: Mapping[str, Shape]) -> list[str]:
    """The SD/SDXL/Flux.1 tables and the diffusers families that hold every module of ``shapes``, best first.

    A table or family whose shapes match exactly comes first; name-only matches follow (tiny
    test models, or a family that shares another's module names, as SD3 does Flux.1's). The
    families are only asked when the tables find no exact match and diffusers is installed.

    Example:
        >>> architectures_of({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048)})
        ['sdxl']
    """
    from loramerge.io.formats.sd_names import ARCHITECTURES, identify

    found = identify(shapes)
    if found and all(ARCHITECTURES[found[0]].shapes.get(m) == tuple(s) for m, s in shapes.items()):
        return found
    if not diffusers_available():
        return found
    denoiser = {m: tuple(s) for m, s in shapes.items() if m.split(".", 1)[0] in ("transformer", "transformer_2")}
    families = families_of(list(denoiser))
    exact = [f for f in families
             if all(family_modules(f).get("transformer." + m.split(".", 1)[1]) == s for m, s in denoiser.items())]
    return list(dict.fromkeys([*exact, *found, *families]))
