"""Which weights transformers quantizes when it loads a model in 4-bit or 8-bit with bitsandbytes.

transformers (5.x, ``replace_with_bnb_linear``) swaps exactly the modules whose type *is*
``torch.nn.Linear`` (subclasses stay) or GPT-2's ``Conv1D``, except those ``should_convert_module``
skips: by default (``get_keys_to_not_convert``) tied weights, the module owning the model's last
parameter and the output embeddings (``lm_head``); when ``llm_int8_skip_modules`` is given it
replaces those defaults; ``_keep_in_fp32_modules`` always stay. Embeddings, norms, convolutions and
fused 3-D expert parameters are never quantized. This module answers the question by building the
model from its ``config.json`` on the meta device (no weights, no memory) and asking transformers'
own helpers, so it needs transformers.

Importing transformers and building the model costs a few seconds, as much as folding a 2 GB base,
so the answer (which modules are candidates, which are skipped) is kept on disk, keyed by the
config, the skip list and transformers' version (:mod:`loramerge.io.cache`): the next fold of the
same base reads it back without importing transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from loramerge.errors import UnsupportedAdapter
from loramerge.io.cache import read_cached, write_cached

CACHE_SECTION = "quant-targets"


@dataclass
class QuantTargets:
    """Weight tensors transformers would quantize: ``weights`` (checkpoint names), ``transposed`` (Conv1D ones)."""

    weights: list[str]
    transposed: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)  # module names transformers keeps in full precision
    missing: list[str] = field(default_factory=list)  # quantized modules with no tensor of that name on disk


def bnb_targets(config: dict[str, Any], names: Collection[str], skip_modules: list[str] | None = None,
                where: object = "base model") -> QuantTargets:
    """The checkpoint tensors (``<module>.weight``) transformers' bitsandbytes integration would quantize.

    ``skip_modules`` is ``llm_int8_skip_modules`` (it replaces transformers' default skips).
    """
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        raise _needs_transformers(where) from None
    key = hashlib.sha256(json.dumps([config, skip_modules, version], sort_keys=True, default=str).encode()).hexdigest()
    modules = _cached_modules(key)
    if modules is None:
        modules = _linear_modules(config, skip_modules, where)
        write_cached(CACHE_SECTION, key, modules)
    targets = QuantTargets([])
    for module_name, transposed, converted in modules:
        if not converted:
            targets.skipped.append(module_name)
            continue
        tensor = f"{module_name}.weight"
        if tensor not in names:
            targets.missing.append(module_name)
            continue
        targets.weights.append(tensor)
        if transposed:
            targets.transposed.add(tensor)
    return targets


def _needs_transformers(where: object) -> UnsupportedAdapter:
    return UnsupportedAdapter(
        f"{where}: --base-quant needs transformers to know which modules it quantizes; pip install transformers")


def _cached_modules(key: str) -> list[tuple[str, bool, bool]] | None:
    rows = read_cached(CACHE_SECTION, key)
    ours = isinstance(rows, list) and all(
        isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and all(isinstance(f, bool) for f in row[1:])
        for row in rows)
    return [(name, transposed, converted) for name, transposed, converted in rows] if ours else None


def _linear_modules(config: dict[str, Any], skip_modules: list[str] | None,
                    where: object) -> list[tuple[str, bool, bool]]:
    """Every module transformers may quantize: (name, is GPT-2's Conv1D, converted), in model order."""
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        raise _needs_transformers(where) from None
    model = _meta_model(transformers, config, where)
    skip = list(skip_modules) if skip_modules is not None else get_keys_to_not_convert(model)
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [(name, isinstance(module, Conv1D), bool(should_convert_module(name, skip)))
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear or isinstance(module, Conv1D)]


def _meta_model(transformers: Any, config: dict[str, Any], where: object) -> Any:
    import torch

    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if not architectures or not model_type:
        raise UnsupportedAdapter(f"{where}: config.json names no architectures/model_type, so which modules "
                                 "transformers quantizes cannot be known")
    model_class = getattr(transformers, architectures[0], None)
    if model_class is None:
        raise UnsupportedAdapter(f"{where}: transformers {transformers.__version__} has no model class "
                                 f"{architectures[0]} (custom code is not run)")
    try:
        hf_config = transformers.AutoConfig.for_model(
            model_type, **{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")})
        with torch.device("meta"):
            return model_class(hf_config)
    except Exception as exc:  # any failure of transformers to build the model from this config
        raise UnsupportedAdapter(f"{where}: transformers could not build {architectures[0]} from config.json "
                                 f"({type(exc).__name__}: {exc})") from None
