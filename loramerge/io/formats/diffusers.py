"""diffusers LoRA files (``pytorch_lora_weights.safetensors``): reader and writer.

**Read.** Three key styles, all behind an optional pipeline component prefix (``unet.``,
``text_encoder.``, ``text_encoder_2.``, ``transformer.``; bare UNet/transformer paths are
recognised by their first name):

* PEFT style (what ``save_lora_weights`` writes today): ``<m>.lora_A.weight`` / ``.lora_B.weight``;
* the old ``LoRACompatible`` style: ``<m>.lora.down.weight`` / ``.up.weight`` (text encoders:
  ``<m>.lora_linear_layer.down.weight``);
* the old attention-processor style: ``…attn1.processor.to_q_lora.down.weight`` (``to_out_lora``
  is ``to_out.0``; in a text encoder ``to_q_lora`` is ``q_proj`` …).

The scale comes from the ``lora_adapter_metadata`` JSON in the safetensors header (component
prefixed LoraConfig fields: ``unet.r``, ``unet.lora_alpha``, ``unet.alpha_pattern`` …), read by
PEFT's own rules (:func:`loramerge.io.formats.peft.adapter_from_tensors`); else from ``<m>.alpha``
tensors (``alpha / r``); else it is 1, diffusers' convention (alpha = rank).

**Write.** A folder with ``pytorch_lora_weights.safetensors`` in PEFT style, scale baked into the
factors, and ``lora_adapter_metadata`` holding each component's LoraConfig (``alpha = r`` per
module), which ``load_lora_weights`` uses as is. DoRA magnitudes are written as PEFT's
``lora_magnitude_vector`` (``use_dora``), bias updates as ``lora_B.bias`` (``lora_bias``).

Example:
    >>> normalize_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight")
    'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight'
    >>> normalize_key("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight")
    'text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight'
    >>> normalize_key("text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight")  # transformers ≥ 5 CLIP
    'text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight'
    >>> normalize_key("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight")  # T5: as is
    'text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight'
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import CorruptFile, UnknownFormat, UnsupportedAdapter
from loramerge.io.factors import checked_tensors, factor, scalar
from loramerge.io.formats import peft
from loramerge.io.formats.component import COMPONENT_KEY, DENOISERS
from loramerge.io.formats.families import architectures_of
from loramerge.io.formats.sd_names import COMPONENTS
from loramerge.io.formats.tensorfile import (
    check_keys,
    read_safetensors_header,
    read_tensor_file,
    write_safetensors,
)
from loramerge.io.structured import parse_json

NAME = "diffusers"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_lora_weights.bin"
METADATA_KEY = "lora_adapter_metadata"

# First path names of bare (prefix-less) keys, per component.
_BARE = {
    "unet": ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding"),
    "transformer": ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                    "time_text_embed", "norm_out", "proj_out"),
    "text_encoder": ("text_model",),
}
_OLD_FACTORS = {"down": "lora_A", "up": "lora_B"}
# The full tensors diffusers' LoRA loaders take beside LoRA factors: a Flux control LoRA's attention
# norm scales (FluxLoraLoaderMixin._control_lora_supported_norm_keys).
_CONTROL_NORM = re.compile(r"^transformer\.(?:.+\.)?attn\.norm_(?:added_)?[qk]\.weight$")
_CLIP_TOP = ("encoder.layers.", "embeddings.", "final_layer_norm.")
_PROCESSOR_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_PROCESSOR_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_OLD_STYLE = re.compile(r"^(?P<module>.+?)(?:\.lora|\.lora_linear_layer)\.(?P<part>down|up)\.weight$")
_PROCESSOR_STYLE = re.compile(r"^(?P<module>.+?)\.(?:processor\.)?(?P<proc>to_(?:q|k|v|out)_lora)\.(?P<part>down|up)\.weight$")


def component_of(path: str) -> str | None:
    """The pipeline component of a dotted key: its prefix, or what a bare path's first name implies.

    Example:
        >>> component_of("unet.conv_in.lora_A.weight"), component_of("single_transformer_blocks.0.proj_out")
        ('unet', 'transformer')
    """
    head = path.split(".", 1)[0]
    if head in COMPONENTS:
        return head
    for component, names in _BARE.items():
        if head in names:
            return component
    return None


def normalize_key(key: str) -> str | None:
    """``key`` in PEFT style with its component prefix (``unet.<m>.lora_A.weight``), or None if not a diffusers LoRA key.

    ``.alpha`` keys keep their suffix.
    """
    component = component_of(key)
    if component is None:
        return None
    body = key[len(component) + 1:] if key.startswith(component + ".") else key
    text = component.startswith("text_encoder")
    if text and body.startswith(_CLIP_TOP):
        # Saved from a transformers ≥ 5 CLIPTextModel, which has no ``text_model`` level.
        body = "text_model." + body
    match = _PROCESSOR_STYLE.match(body)
    if match:
        names = _PROCESSOR_TEXT if text else _PROCESSOR_UNET
        module = f"{match['module']}.{names[match['proc']]}"
        return f"{component}.{module}.{_OLD_FACTORS[match['part']]}.weight"
    match = _OLD_STYLE.match(body)
    if match:
        return f"{component}.{match['module']}.{_OLD_FACTORS[match['part']]}.weight"
    if body.endswith(".alpha"):
        return f"{component}.{body}"
    if peft.split_key(body, key_prefix="") is not None:
        return f"{component}.{body}"
    return None


def detect(path: Path) -> bool:
    """True for a folder holding ``pytorch_lora_weights.safetensors``, or a ``.safetensors`` file of diffusers LoRA keys."""
    if path.is_dir():
        return (path / WEIGHTS_NAME).is_file() and not (path / peft.CONFIG_NAME).is_file()
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        header, _ = read_safetensors_header(path)
    except CorruptFile:
        return False
    return any((n := normalize_key(k)) is not None and not n.endswith(".alpha") for k in header)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    raise CorruptFile(f"{path}: no {WEIGHTS_NAME}")


def read(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None) -> Adapter:
    """Read a diffusers LoRA file (or the folder holding it) into an :class:`Adapter` named by component."""
    del base  # diffusers keys are already module paths
    file = _weights_file(path)
    tensors, header_meta = read_tensor_file(file, allow_pickle=allow_pickle)
    tensors = checked_tensors(tensors, file)
    adapter_meta = _adapter_metadata(header_meta, file)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    unknown = []
    replaced = {}
    for key, tensor in tensors.items():
        if _CONTROL_NORM.match(key):
            replaced[key] = tensor
            continue
        normal = normalize_key(key)
        if normal is None:
            unknown.append(key)
            continue
        component, body = normal.split(".", 1)
        if body.endswith(".alpha"):
            module = body[: -len(".alpha")]
            alphas.setdefault(component, {})[module] = scalar(tensor, file, module, "alpha")
            continue
        if body in by_component.get(component, {}):
            raise CorruptFile(f"{file}: key {key} duplicates another spelling of the same tensor")
        by_component.setdefault(component, {})[body] = tensor
    check_keys(file, unknown, found=bool(by_component), layout="diffusers LoRA")

    layers: dict[str, LowRank] = {}
    for component, parts in by_component.items():
        config = _component_config(component, parts, adapter_meta, alphas.get(component, {}), file)
        sub = peft.adapter_from_tensors(parts, config, origin=file, key_prefix="", source_format=NAME)
        if sub.full_weights:
            raise UnknownFormat(f"{file}: keys in no diffusers LoRA layout: {', '.join(sorted(sub.full_weights)[:5])}")
        layers.update({f"{component}.{m}": lr for m, lr in sub.layers.items()})
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point() and t.ndim > 0}
    architectures = architectures_of({m: tuple(lr.delta_shape) for m, lr in layers.items()})
    config: dict[str, Any] = {"metadata": header_meta}
    if architectures:
        config["architectures"] = architectures
    return Adapter(layers, source_format=NAME, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
                   source=str(path), config=config, full_weights=replaced)


def _adapter_metadata(header: dict[str, str], origin: Path) -> dict[str, Any]:
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    return parse_json(raw, name=f"{origin}: {METADATA_KEY}")


def _component_config(component: str, parts: dict[str, torch.Tensor], adapter_meta: dict[str, Any],
                      alphas: dict[str, float], origin: Path) -> dict[str, Any]:
    """The LoraConfig of one component: from the header metadata, else per-module ranks with alphas (default = rank)."""
    prefix = component + "."
    given = {k[len(prefix):]: v for k, v in adapter_meta.items() if k.startswith(prefix)}
    if given:
        config = {"peft_type": "LORA", **given}
        peft.check_config(config, f"{origin} ({METADATA_KEY}, {component})")
        return config
    ranks = {}
    for key, tensor in parts.items():
        parsed = peft.split_key(key, key_prefix="")
        if parsed is not None and parsed[1] in ("lora_A", "lora_embedding_A"):
            ranks[parsed[0]] = int(factor(tensor, origin, f"{component}.{parsed[0]}", parsed[1]).shape[0])
    if not ranks:
        return {"peft_type": "LORA"}
    values = {m: alphas.get(m, float(r)) for m, r in ranks.items()}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(values.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "r": default_rank,
        "lora_alpha": default_alpha,
        "rank_pattern": peft.full_path_patterns(ranks, default_rank),
        "alpha_pattern": peft.full_path_patterns(values, default_alpha),  # type: ignore[arg-type]
    }


def write(adapter: Adapter, folder: Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter`` as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``).

    diffusers loads a file's ``transformer.`` keys into one denoiser, the second one of Wan 2.2
    when asked (``load_into_transformer_2=True``), so an adapter for ``transformer_2`` alone is
    written under ``transformer.`` with its component recorded in the header; one for both
    denoisers is refused (one file per expert).
    """
    experts = sorted({m.split(".", 1)[0] for m in adapter.layers} & set(DENOISERS))
    if len(experts) > 1:
        raise UnsupportedAdapter(
            f"{adapter.source or 'adapter'}: modules for both {' and '.join(experts)}; diffusers loads one denoiser "
            "per LoRA file (load_lora_weights(..., load_into_transformer_2=True) for the second): write each expert "
            "to its own file, or use --to peft to keep both in one"
        )
    others = sorted(k for k in adapter.full_weights if not _CONTROL_NORM.match(k))
    if others:
        raise UnsupportedAdapter(
            f"{adapter.source or 'adapter'}: full weights {', '.join(others[:3])} have no place in a diffusers LoRA "
            "file (it holds LoRA factors and Flux control norms only); write --to peft"
        )
    header: dict[str, str] = {}
    if experts == ["transformer_2"]:
        header[COMPONENT_KEY] = "transformer_2"
    components: dict[str, dict[str, LowRank]] = {}
    for module, lr in adapter.layers.items():
        component, _, rest = module.partition(".")
        if component not in COMPONENTS or not rest:
            raise UnsupportedAdapter(
                f"module {module}: diffusers files name modules by pipeline component ({', '.join(COMPONENTS)}); "
                "this name has none (read kohya files without --base, or with a diffusers pipeline folder as --base)"
            )
        components.setdefault("transformer" if component in DENOISERS else component, {})[rest] = lr.baked()
    tensors: dict[str, torch.Tensor] = {k: v.to(dtype) for k, v in adapter.full_weights.items()}
    metadata: dict[str, Any] = {}
    for component, layers in components.items():
        for name, lr in layers.items():
            tensors[f"{component}.{name}.lora_A.weight"] = lr.A.to(dtype)
            tensors[f"{component}.{name}.lora_B.weight"] = lr.B.to(dtype)
            if lr.magnitude is not None:
                tensors[f"{component}.{name}.lora_magnitude_vector"] = peft.peft_magnitude(lr).to(dtype)
            if lr.bias is not None:
                tensors[f"{component}.{name}.lora_B.bias"] = lr.bias.to(dtype)
        # transformers ≥ 5 drops CLIPTextModel's ``text_model`` level; diffusers strips it from the
        # keys, so the config names modules by the part both layouts end with.
        short = {n.removeprefix("text_model.") if component.startswith("text_encoder") else n: lr
                 for n, lr in layers.items()}
        sub = adapter.with_layers(short, full_weights={})
        config = peft.build_config(sub, {n: lr.rank for n, lr in short.items()})
        config.pop("modules_to_save", None)
        config["use_dora"] = peft.uses_dora(sub)
        config["lora_bias"] = any(lr.bias is not None for lr in short.values())
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    write_safetensors(tensors, folder / WEIGHTS_NAME, {METADATA_KEY: json.dumps(metadata, sort_keys=True), **header})
