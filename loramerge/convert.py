"""Converting an adapter from one format to another without changing its update."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter
from loramerge.io.output import check_output
from loramerge.io.sources import load
from loramerge.merge.blocks import BlockWeighting, weigh_blocks


def convert(source: str | Path | Adapter, output: str | Path, to: str | None = None, *,
            dtype: torch.dtype | str | None = None, force: bool = False, from_format: str | None = None,
            base: str | Path | None = None, allow_pickle: bool = False,
            block_weights: str | Sequence[str] | None = None) -> Path:
    """Read ``source`` and write the same updates to ``output`` in format ``to`` (default: the source's own).

    Every module's ΔW is preserved exactly (up to the output ``dtype``): LyCORIS modules are written
    as their exact B@A expansion, Flux's split q/k/v are re-fused for kohya and split for
    diffusers. ``from_format`` overrides detection; ``base`` resolves kohya names from a checkpoint.
    ``block_weights`` scales the modules by block first (a preset such as ``"OUTALL"``, a block
    vector or rules; see :mod:`loramerge.merge.blocks`), which is exact: ΔW ← w·ΔW per module.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import Adapter, LowRank, load
        >>> folder = tempfile.mkdtemp()
        >>> lr = LowRank(torch.ones(2, 768), torch.ones(768, 2), scale=0.5)
        >>> peft_dir = Adapter({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": lr}).save(folder + "/peft")
        >>> out = convert(peft_dir, folder + "/lora.safetensors", to="kohya")
        >>> kohya = load(out)
        >>> kohya.source_format, kohya.modules
        ('kohya', ['text_encoder.text_model.encoder.layers.0.self_attn.q_proj'])
    """
    check_output(output, force=force)
    weighting = BlockWeighting.parse(block_weights, sources=1)
    adapter = load(source, format=from_format, allow_pickle=allow_pickle, base=base)
    (adapter,) = weigh_blocks([adapter], weighting)
    return adapter.save(output, format=to, dtype=dtype, force=force)
