"""Which resolver a fold uses for a base: Hugging Face names, a diffusers component, or a single file.

A :data:`~loramerge.io.names.Resolver` maps an adapter's parameter path to the base checkpoint's
tensor name. This module picks the right one for each kind of base.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from typing import Any

from loramerge.io.checkpoint import Checkpoint
from loramerge.io.names import Resolver, ResolverResult, hf_resolver


def default_resolver(ckpt: Checkpoint) -> Resolver:
    """The resolver for a base: :func:`~loramerge.io.names.hf_resolver` for a model folder, the same inside
    the component for a diffusers UNet/transformer folder (``unet.x`` → ``x``), and for a single file
    a :class:`~loramerge.io.single_file.SingleFileResolver` built from its tensors.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from loramerge.io.checkpoint import open_checkpoint
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"fc.weight": torch.zeros(4, 3)}, folder / "model.safetensors")
        >>> default_resolver(open_checkpoint(folder)) is hf_resolver
        True
        >>> _ = (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
        >>> default_resolver(open_checkpoint(folder))("unet.fc.weight", {"fc.weight"})
        'fc.weight'
    """
    if ckpt.file is not None:
        from loramerge.io.single_file import SingleFileResolver

        return SingleFileResolver({name: info.shape for name, info in ckpt.tensors.items()})
    component = diffusers_component(ckpt.config)
    return hf_resolver if component is None else partial(_inside_component, component)


def diffusers_component(config: dict[str, Any]) -> str | None:
    """The pipeline component a diffusers model folder's config names (``unet``, ``transformer``), if any.

    Example:
        >>> diffusers_component({"_class_name": "FluxTransformer2DModel"}), diffusers_component({"model_type": "llama"})
        ('transformer', None)
    """
    name = str(config.get("_class_name", ""))
    if name.startswith("UNet2DConditionModel"):
        return "unet"
    if name.endswith(("Transformer2DModel", "Transformer3DModel")):  # image and video denoisers
        return "transformer"
    return None


def component_resolver(path: str, names: Collection[str]) -> ResolverResult:
    """:func:`~loramerge.io.names.hf_resolver` inside one pipeline component, with or without CLIP's ``text_model.``.

    Example:
        >>> component_resolver("text_model.encoder.layers.0.mlp.fc1.weight", {"encoder.layers.0.mlp.fc1.weight"})
        'encoder.layers.0.mlp.fc1.weight'
    """
    found = hf_resolver(path, names)
    if found is None:
        other = path.removeprefix("text_model.") if path.startswith("text_model.") else "text_model." + path
        found = hf_resolver(other, names)
    return found


def _inside_component(component: str, path: str, names: Collection[str]) -> ResolverResult:
    if path.startswith(component + "."):
        return component_resolver(path[len(component) + 1:], names)
    return hf_resolver(path, names)
