"""The output's shards: which tensors go in which file, in which dtype, and whether they fit on the disk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.errors import WriteFailed
from loramerge.fold.plan import FoldPlan
from loramerge.io.checkpoint import Checkpoint, TensorInfo, dtype_code
from loramerge.io.shards import OutEntry, pack_shards, safetensors_name, shard_names


@dataclass
class OutShard:
    """One output file: its name, its tensors in order, where each comes from, and its metadata."""

    name: str
    entries: list[OutEntry]
    sources: dict[str, TensorInfo]
    metadata: dict[str, str]


def plan_layout(ckpt: Checkpoint, plan: FoldPlan, out_dtype: torch.dtype | None, limit: int | None) -> list[OutShard]:
    """The output shards: the input's, with the same names, unless ``limit`` (bytes) asks for new ones.

    Example:
        >>> import tempfile
        >>> from loramerge.io.checkpoint import open_checkpoint
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"a": torch.zeros(4), "b": torch.zeros(4)}, folder / "model.safetensors")
        >>> empty = FoldPlan({}, {}, False, 0)
        >>> [(s.name, [e.name for e in s.entries]) for s in plan_layout(open_checkpoint(folder), empty, None, 16)]
        [('model-00001-of-00002.safetensors', ['a']), ('model-00002-of-00002.safetensors', ['b'])]
    """

    def entry(info: TensorInfo, name: str) -> OutEntry:
        code = dtype_code(out_dtype) if out_dtype is not None and info.is_float else info.dtype
        return OutEntry(name, code, plan.widened.get(name, info.shape))

    groups: list[tuple[str, list[tuple[OutEntry, TensorInfo]], dict[str, str]]] = []
    for shard in ckpt.shards:
        rows = []
        for info in ckpt.tensors_in(shard):
            rows.append((entry(info, info.name), info))
            for extra, source in plan.extra.items():
                if source == info.name:
                    rows.append((entry(info, extra), info))
        groups.append((safetensors_name(shard), rows, ckpt.shard_metadata.get(shard) or {"format": "pt"}))
    if limit is None:
        return [OutShard(name, [e for e, _ in rows], {e.name: i for e, i in rows}, meta) for name, rows, meta in groups]
    flat = [row for _, rows, _ in groups for row in rows]
    sources = {e.name: i for e, i in flat}
    packed = pack_shards([e for e, _ in flat], limit)
    meta = groups[0][2] if groups else {"format": "pt"}
    return [OutShard(name, group, {e.name: sources[e.name] for e in group}, meta)
            for name, group in zip(shard_names(len(packed), ckpt.shard_stem), packed)]


def check_space(output: Path, layout: list[OutShard]) -> None:
    """Refuse, before writing anything, an output the disk under ``output`` has no room for."""
    needed = sum(e.nbytes for shard in layout for e in shard.entries)
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise WriteFailed(
            f"{output}: the folded model needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there; "
            "nothing was written"
        )
