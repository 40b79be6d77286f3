"""Which pipeline component (denoiser) a LoRA file is for, when the file cannot say.

Wan 2.2 has two denoisers, ``transformer`` (the high-noise expert) and ``transformer_2`` (the
low-noise one), and trainers write a LoRA for each in the same layout: nothing in an expert-2
file says it is for ``transformer_2``, so it reads as ``transformer``. diffusers has the same
problem and takes the answer from the caller (``load_lora_weights(..., load_into_transformer_2=True)``);
loramerge takes it from ``component`` (``--component transformer_2``), which moves every denoiser
module of the file to that component.

A file loramerge writes for one expert records it in its safetensors header
(``loramerge_component``), so it reads back as that expert; diffusers ignores the entry.

Example:
    >>> import torch
    >>> from loramerge.core.adapter import Adapter, LowRank
    >>> ad = Adapter({"transformer.blocks.0.attn1.to_q": LowRank(torch.ones(1, 2), torch.ones(2, 1))},
    ...              config={"architectures": ["wan"]})
    >>> for_component(ad, "transformer_2").modules
    ['transformer_2.blocks.0.attn1.to_q']
    >>> denoiser_component(for_component(ad, "transformer_2"))
    'transformer_2'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loramerge.core.adapter import Adapter
from loramerge.errors import InvalidParameter, UnsupportedAdapter
from loramerge.io.formats.families import FAMILIES

COMPONENT_KEY = "loramerge_component"
DENOISERS = ("transformer", "transformer_2")
# Config entries keyed by module name (or holding module names) that move with the modules.
_BY_MODULE = ("algorithms", "native")


def denoiser_component(adapter: Adapter) -> str | None:
    """The one denoiser component ``adapter``'s modules name, or None (none, or several)."""
    found = {m.split(".", 1)[0] for m in adapter.layers} & set(DENOISERS)
    return found.pop() if len(found) == 1 else None


def recorded_component(metadata: Mapping[str, Any] | None) -> str | None:
    """The component a file's header records (:data:`COMPONENT_KEY`), or None."""
    value = (metadata or {}).get(COMPONENT_KEY)
    return value if isinstance(value, str) and value in DENOISERS else None


def for_component(adapter: Adapter, component: str) -> Adapter:
    """``adapter`` with every denoiser module (``transformer.…``, ``transformer_2.…``) moved to ``component``.

    The component must be one the adapter's family has (Wan: ``transformer``, ``transformer_2``);
    an adapter naming modules of two denoisers is refused, since it already says where each goes.
    """
    origin = adapter.source or "adapter"
    if component not in DENOISERS:
        raise InvalidParameter(f"--component {component}: the denoiser components are {', '.join(DENOISERS)}",
                               parameter="component")
    present = sorted({m.split(".", 1)[0] for m in adapter.layers} & set(DENOISERS))
    if not present:
        raise UnsupportedAdapter(f"{origin}: --component {component} moves denoiser modules (transformer.…); "
                                 "this adapter has none")
    if len(present) > 1:
        raise UnsupportedAdapter(f"{origin}: holds modules for both {' and '.join(present)}; --component names the "
                                 "one denoiser a single-expert file is for")
    families = [FAMILIES[a] for a in adapter.config.get("architectures") or [] if a in FAMILIES]
    if families and not any(component in f.components for f in families):
        raise UnsupportedAdapter(f"{origin}: --component {component}: this is a {families[0].label} LoRA, whose "
                                 f"denoiser is {', '.join(families[0].components)}")
    if present[0] == component:
        return adapter

    def moved(module: str) -> str:
        head, _, rest = module.partition(".")
        return f"{component}.{rest}" if head in DENOISERS and rest else module

    config = dict(adapter.config)
    for key in _BY_MODULE:
        if isinstance(config.get(key), Mapping):
            config[key] = {moved(m): v for m, v in config[key].items()}
    if config.get("flattened"):
        config["flattened"] = [moved(m) for m in config["flattened"]]
    if isinstance(config.get("keys"), Mapping):
        config["keys"] = {k: [moved(m) for m in v] if isinstance(v, list) else moved(v)
                          for k, v in config["keys"].items()}
    config["component"] = component
    return adapter.with_layers({moved(m): lr for m, lr in adapter.layers.items()}, config=config,
                               full_weights={moved(k): v for k, v in adapter.full_weights.items()})
