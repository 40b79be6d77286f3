"""The metadata of a written kohya file: minimal ``ss_*`` keys, the loramerge recipe, and kohya's hashes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import safetensors.torch
import torch

from loramerge._version import __version__
from loramerge.core.adapter import Adapter
from loramerge.io.formats.component import COMPONENT_KEY, denoiser_component
from loramerge.io.formats.families import FAMILIES
from loramerge.io.formats.kohya.names import choose_architecture
from loramerge.io.formats.original_names import family_for_writing

METADATA_KEY = "loramerge"


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
    elif (family := family_for_writing(adapter)) is not None:  # Flux.2's names are mostly Flux.1's: say which
        metadata["ss_base_model_version"] = FAMILIES[family].base_model_version
    metadata[METADATA_KEY] = json.dumps(recipe(adapter))
    if denoiser_component(adapter) == "transformer_2":  # musubi names cannot say which Wan 2.2 expert
        metadata[COMPONENT_KEY] = "transformer_2"
    return metadata


def recipe(adapter: Adapter) -> dict[str, Any]:
    """What produced ``adapter``: the merge report's method, weights, parameters and sources, or its source file."""
    info: dict[str, Any] = {"version": __version__}
    report = adapter.report
    if report is not None:
        info.update(method=report.method, weights=report.weights, parameters=report.parameters, sources=report.sources)
    else:
        info.update(converted_from=adapter.source, source_format=adapter.source_format)
        if adapter.config.get("block_weights") is not None:  # converted with --block-weights
            info["block_weights"] = adapter.config["block_weights"]
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
