"""Writing LyCORIS files that keep LoHa, LoKr, full and Tucker modules in their own factors.

Reading a LyCORIS module expands it exactly into ``B @ A`` (:mod:`loramerge.io.formats.lycoris`),
which is what merging needs but can be far larger than the file (a LoKr of rank 8 on a
1280×1280 weight is 1280×… once expanded). The reader therefore keeps each module's own tensors
beside the update it read (:class:`NativeModule`); the LyCORIS writer stores a module whose update
is still that very object with those tensors, unchanged, and every other module (merged,
re-ranked, converted from LoRA) as LyCORIS LoCon (``lora_down``/``lora_up``/``alpha``, plus
``dora_scale`` and ``diff_b``). Re-saving or converting a LoKr keeps it factored and the same size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.io.formats.kohya.metadata import build_metadata, kohya_hashes
from loramerge.io.formats.kohya.write import kohya_state_dict, writer_names
from loramerge.io.formats.tensorfile import write_safetensors

NATIVE_KEY = "native"
ALGORITHMS = ("loha", "lokr", "full", "lora-tucker")


@dataclass(frozen=True)
class NativeModule:
    """A module's tensors as its LyCORIS file stores them (kohya suffixes), and the update read from them."""

    update: LowRank
    name: str | None
    parts: dict[str, torch.Tensor]


def kept(adapter: Adapter) -> dict[str, NativeModule]:
    """The modules whose update is still the one read from their LyCORIS tensors."""
    records = adapter.config.get(NATIVE_KEY) or {}
    return {m: r for m, r in records.items() if isinstance(r, NativeModule) and adapter.layers.get(m) is r.update}


def write(adapter: Adapter, path: Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter`` as a LyCORIS ``.safetensors`` file (kohya names), LoHa/LoKr/full modules unexpanded."""
    native = kept(adapter)
    rest = adapter.with_layers({m: lr for m, lr in adapter.layers.items() if m not in native})
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if rest.layers:
        tensors, ranks, alphas = kohya_state_dict(rest, dtype, bias_key="diff_b")
    names = writer_names(adapter)
    for module, record in native.items():
        name = record.name or names[module]
        for suffix, tensor in record.parts.items():
            tensors[f"{name}.{suffix}"] = tensor.float() if suffix == "alpha" else tensor.to(dtype).contiguous()
        ranks[name] = record.update.rank
        alphas[name] = float(record.parts["alpha"].item()) if "alpha" in record.parts else float(record.update.rank)
    ndims = {n: 4 if any(t.ndim == 4 for k, t in tensors.items() if k.startswith(n + ".")) else 2 for n in ranks}
    metadata = build_metadata(adapter, ranks, alphas, ndims)
    metadata["ss_network_module"] = "lycoris.kohya"
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    write_safetensors(tensors, path, metadata)


# The stored tensor of each algorithm that its update is linear in: scaling it scales ΔW exactly.
_LINEAR_PARTS = (("hada_w1_a",), ("lokr_w1",), ("lokr_w1_a",), ("diff", "diff_b"), ("lora_up.weight",))


def scaled_native(record: NativeModule, factor: float, update: LowRank) -> NativeModule | None:
    """``record`` with its update times ``factor`` (one linear factor scaled), standing for ``update``.

    Used by block weights, so that a scaled LoHa or LoKr module is still written in its own
    factors. None when the record has no part its update is linear in.

    Example:
        >>> import torch
        >>> lr = LowRank(torch.ones(1, 2), torch.ones(2, 1))
        >>> rec = NativeModule(lr, None, {"hada_w1_a": torch.ones(2, 1), "hada_w1_b": torch.ones(1, 2)})
        >>> scaled_native(rec, 0.5, lr).parts["hada_w1_a"].tolist()
        [[0.5], [0.5]]
    """
    for names in _LINEAR_PARTS:
        if names[0] in record.parts:
            parts = {k: v * factor if k in names else v for k, v in record.parts.items()}
            return NativeModule(update, record.name, parts)
    return None
