"""Which base weights an adapter's modules reach: what ``loramerge inspect ADAPTER --base MODEL`` shows.

Names resolve exactly as :func:`~loramerge.fold.engine.fold` resolves them (the same resolvers), so
what ``inspect`` reports is what a fold would touch: each module's base tensors, the modules that
reach nothing, and the base weights of the adapted kinds that no module reaches (the ``to_q`` of
blocks a LoRA skipped, say). A *kind* is a weight's last non-numeric name (``to_q``, ``proj``, ``q``).

Example:
    >>> import tempfile, torch
    >>> from loramerge.core.adapter import Adapter, LowRank
    >>> from loramerge.io.formats.tensorfile import write_safetensors
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_safetensors({f"blocks.{i}.to_q.weight": torch.zeros(4, 3) for i in range(2)}, folder / "model.safetensors")
    >>> found = coverage(Adapter({"blocks.0.to_q": LowRank(torch.ones(2, 3), torch.ones(4, 2))}), folder)
    >>> found["matched"], found["untouched"]
    ({'blocks.0.to_q': ['blocks.0.to_q.weight']}, ['blocks.1.to_q.weight'])
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from loramerge.core.adapter import Adapter
from loramerge.fold.pipelines import PIPELINE_INDEX, pipeline_components
from loramerge.fold.resolvers import component_resolver, default_resolver
from loramerge.io.checkpoint import open_checkpoint
from loramerge.io.formats.tensorfile import read_json_object
from loramerge.io.names import Resolver, as_targets, nearest


def coverage(adapter: Adapter, base: str | Path) -> dict[str, Any]:
    """``{"matched": {module: [tensor…]}, "unmatched": {module: [nearest…]}, "untouched": [tensor…]}`` for ``base``."""
    base = Path(base)
    names: dict[str, Collection[str]] = {}
    resolvers: dict[str, Resolver] = {}
    if base.is_dir() and (base / PIPELINE_INDEX).is_file():
        index = read_json_object(base / PIPELINE_INDEX)
        for component in pipeline_components(base, index):
            names[component] = set(open_checkpoint(base / component).tensors)
            resolvers[component] = component_resolver
    else:
        ckpt = open_checkpoint(base)
        names[""] = set(ckpt.tensors)
        resolvers[""] = default_resolver(ckpt)
    matched: dict[str, list[str]] = {}
    unmatched: dict[str, list[str]] = {}
    for module in adapter.layers:
        component, path = _component_of(module, names)
        found = as_targets(resolvers[component](f"{path}.weight", names[component]))
        prefix = f"{component}/" if component else ""
        if found:
            matched[module] = sorted({prefix + t.name for t in found})
        else:
            unmatched[module] = [prefix + n for n in nearest(f"{path}.weight", names[component])]
    touched = {n for tensors in matched.values() for n in tensors}
    kinds = {_kind(n) for n in touched}
    untouched = sorted(f"{c}/{n}" if c else n for c, tensors in names.items() for n in tensors
                       if n.endswith(".weight") and _kind(n) in kinds and (f"{c}/{n}" if c else n) not in touched)
    return {"matched": matched, "unmatched": unmatched, "untouched": untouched}


def _component_of(module: str, names: dict[str, Collection[str]]) -> tuple[str, str]:
    head, _, rest = module.partition(".")
    if head in names and rest:
        return head, rest
    return next(iter(names)), module


def _kind(tensor: str) -> str:
    """A weight's kind: its last non-numeric module name (``blocks.3.attn1.to_out.0.weight`` → ``to_out``)."""
    parts = [p for p in tensor.split(".")[:-1] if not p.isdigit()]
    return parts[-1] if parts else tensor
