"""Converting an adapter from one format to another without changing its update."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter
from loramerge.errors import InvalidParameter
from loramerge.io.experts import EXPERT_LAYOUTS, to_fused, to_per_expert
from loramerge.io.output import check_output
from loramerge.io.sources import load
from loramerge.merge.blocks import BlockWeighting, weigh_blocks


def convert(source: str | Path | Adapter, output: str | Path, to: str | None = None, *,
            dtype: torch.dtype | str | None = None, force: bool = False, from_format: str | None = None,
            base: str | Path | None = None, allow_pickle: bool = False, skip_unknown: bool = False,
            experts: str | None = None, expert_layout: str = "qwen2_moe",
            block_weights: str | Sequence[str] | None = None, component: str | None = None) -> Path:
    """Read ``source`` and write the same updates to ``output`` in format ``to`` (default: the source's own).

    Every module's ΔW is preserved exactly (up to the output ``dtype``): LyCORIS LoHa/LoKr modules
    stay factored when written as LyCORIS (the default for a LyCORIS source) and become their exact
    B@A expansion in other formats; Flux's split q/k/v are re-fused for kohya and split for
    diffusers. ``from_format`` overrides detection; ``base`` resolves kohya names from a checkpoint;
    ``skip_unknown`` leaves out modules whose names resolve to nothing (listed in the adapter's
    ``config["skipped"]``) instead of refusing the file. ``experts="split"`` rewrites fused MoE
    expert LoRAs (PEFT ``target_parameters``) as per-expert modules of ``expert_layout``
    (``qwen2_moe``: ``experts.N.gate_proj``/``up_proj``/``down_proj``; ``mixtral``:
    ``block_sparse_moe.experts.N.w1``/``w3``/``w2``); ``experts="fuse"`` does the reverse.
    ``block_weights`` scales the modules by block first (a preset such as ``"OUTALL"``, a block
    vector or rules; see :mod:`loramerge.merge.blocks`), which is exact: ΔW ← w·ΔW per module.
    ``component`` is the denoiser the file is for when it cannot say (``"transformer_2"``: Wan 2.2's
    second expert).

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
    adapter = load(source, format=from_format, allow_pickle=allow_pickle, base=base, skip_unknown=skip_unknown,
                   component=component)
    (adapter,) = weigh_blocks([adapter], weighting)
    if experts is not None:
        if experts not in ("split", "fuse") or expert_layout not in EXPERT_LAYOUTS:
            raise InvalidParameter(f"experts must be split or fuse and the layout one of {', '.join(EXPERT_LAYOUTS)}, "
                                   f"got {experts!r}, {expert_layout!r}")
        adapter = (to_per_expert if experts == "split" else to_fused)(adapter, expert_layout)
    return adapter.save(output, format=to, dtype=dtype, force=force)
