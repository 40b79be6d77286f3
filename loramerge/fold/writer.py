"""Writing a folded model: its shards tensor by tensor, the weight index and the config."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loramerge.core.devices import one_core_spare
from loramerge.fold.layout import OutShard
from loramerge.fold.plan import FoldPlan
from loramerge.fold.streaming import BlockStream, folded_blocks
from loramerge.fold.transfer import transfer_plan
from loramerge.io.checkpoint import Checkpoint, code_dtype
from loramerge.io.shards import ShardWriter
from loramerge.io.structured import read_json


def write_model(ckpt: Checkpoint, plan: FoldPlan, layout: list[OutShard], tmp: Path, compute: torch.dtype,
                device: torch.device, progress: bool, keep_index: bool = True, file: Path | None = None) -> int:
    """Write the layout's shards into folder ``tmp`` (or its one shard to ``file``) and, when sharded, the index.

    Returns the bytes of tensor data written.
    """
    total = sum(e.nbytes for shard in layout for e in shard.entries)
    weight_map: dict[str, str] = {}
    stream = BlockStream(transfer_plan(device), compute)
    with one_core_spare(), tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="fold",
                                disable=not progress) as bar:
        for number, shard in enumerate(layout, 1):
            bar.set_postfix_str(f"shard {number}/{len(layout)}")
            _write_shard(ckpt, plan, shard, file or tmp / shard.name, stream, bar)
            weight_map.update(dict.fromkeys((e.name for e in shard.entries), shard.name))
            if ckpt.pickled:
                ckpt.release()
    if file is None and (len(layout) > 1 or (ckpt.index_file is not None and keep_index)):
        _write_index(ckpt, layout, weight_map, total, tmp)
    return total


def _write_shard(ckpt: Checkpoint, plan: FoldPlan, shard: OutShard, path: Path, stream: BlockStream,
                 bar: tqdm) -> None:
    """One output shard: untouched tensors copied byte for byte, the others folded block by block."""
    with ShardWriter(path, shard.entries, shard.metadata, background=True) as writer:
        for entry in shard.entries:
            source = shard.sources[entry.name]
            updates = plan.updates.get(entry.name)
            if updates is None and entry.dtype == source.dtype and ckpt.copyable(source.name):
                writer.copy(entry.name, source)
            else:
                out = code_dtype(entry.dtype)
                assert out is not None
                writer.write_parts(entry.name, folded_blocks(ckpt, source, updates or [], out, stream, entry.name,
                                                                 plan.widened.get(entry.name)))
            bar.update(entry.nbytes)


def _write_index(ckpt: Checkpoint, layout: list[OutShard], weight_map: dict[str, str], total: int, tmp: Path) -> None:
    """The weight index beside the shards, keeping the input index's own metadata."""
    metadata = {k: v for k, v in ckpt.index_metadata.items() if k not in ("total_size", "total_parameters")}
    metadata["total_size"] = total
    if "total_parameters" in ckpt.index_metadata:
        metadata["total_parameters"] = sum(math.prod(e.shape) for s in layout for e in s.entries)
    index = {"metadata": metadata, "weight_map": weight_map}
    index_name = ckpt.index_file.name if ckpt.index_file is not None else f"{ckpt.shard_stem}.safetensors.index.json"
    (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")


def write_config(ckpt: Checkpoint, tmp: Path, out_dtype: torch.dtype | None, untie: bool,
                 drop_quantization: bool = False, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy ``config.json`` into ``tmp``, with the new dtype, an untie and the plan's ``settings`` (a widened
    Flux.1 input) written in, and without ``quantization_config`` when the base was dequantized; returns what
    changed."""
    source = ckpt.folder / "config.json"
    if not source.is_file():
        return {}
    config = read_json(source)
    changes: dict[str, Any] = {k: v for k, v in (settings or {}).items() if config.get(k) != v}
    config.update(changes)
    if drop_quantization and config.pop("quantization_config", None) is not None:
        changes["quantization_config"] = None
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        for holder in (config, config.get("text_config")):
            if isinstance(holder, dict):
                for key in ("torch_dtype", "dtype"):
                    if key in holder and holder[key] != name:
                        holder[key] = name
                        changes[key] = name
    if untie:
        nested = config.get("text_config")
        if isinstance(nested, dict) and "tie_word_embeddings" in nested:
            nested["tie_word_embeddings"] = False
        config["tie_word_embeddings"] = False
        changes["tie_word_embeddings"] = False
    if changes:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        shutil.copy2(source, tmp / "config.json")
    return changes


def copy_plain_files(folder: Path, tmp: Path, files: Iterable[Path]) -> None:
    """Copy ``files`` of the model folder (tokenizer, generation config …, listed and checked by
    :func:`~loramerge.io.checkpoint.iter_plain_files` before the work) into ``tmp``, keeping subfolders."""
    for path in files:
        dest = tmp / path.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
