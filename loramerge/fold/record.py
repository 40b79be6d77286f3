"""What a fold records about itself: ``loramerge.json`` (or a single file's metadata), with fingerprints.

The record names the tool and version, the base model (where it came from, sha256 of its small
files, the size of each shard, and the record of an earlier fold of it), every adapter (source,
weight, sha256 of its files), the method and its parameters, the output dtype and sharding, what
changed in the config, every tensor that changed and the notes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramerge._version import __version__
from loramerge.core.adapter import Adapter
from loramerge.core.devices import dtype_name
from loramerge.errors import LoramergeError
from loramerge.fold.job import FoldJob
from loramerge.io.checkpoint import Checkpoint
from loramerge.io.structured import parse_json, read_json

RECIPE_NAME = "loramerge.json"
RECIPE_KEY = "loramerge"  # metadata key of the recipe in a folded single file


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 16 MB chunks.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_text("abc")
        >>> file_sha256(p)[:12]
        'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(adapter: Adapter) -> dict[str, str]:
    """sha256 of each file of an adapter read from disk (config and weights); empty for one built in memory.

    Example:
        >>> import tempfile, torch
        >>> from loramerge.core.adapter import LowRank
        >>> path = Adapter({"fc": LowRank(torch.ones(1, 2), torch.ones(2, 1))}).save(tempfile.mkdtemp() + "/a")
        >>> from loramerge.io.sources import load
        >>> sorted(source_fingerprint(load(path)))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    if not adapter.source:
        return {}
    path = Path(adapter.source)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {p.name: file_sha256(p) for p in files if p.suffix in (".json", ".safetensors", ".bin")}


def base_info(folder: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """The base model's part of the record: where it came from and fingerprints of its small files."""
    info: dict[str, Any] = {
        "source": str(folder),
        "name_or_path": ckpt.config.get("_name_or_path"),
        "files": {p.name: file_sha256(p) for p in (folder / "config.json", ckpt.index_file) if p and p.is_file()},
        "shards": {p.name: p.stat().st_size for p in ckpt.shards},
    }
    previous = folder / RECIPE_NAME
    if previous.is_file():
        with contextlib.suppress(LoramergeError):
            info["recipe"] = read_json(previous)
    elif ckpt.file is not None and RECIPE_KEY in ckpt.shard_metadata.get(ckpt.file, {}):
        with contextlib.suppress(LoramergeError):
            info["recipe"] = parse_json(ckpt.shard_metadata[ckpt.file][RECIPE_KEY], name=f"{ckpt.file}: {RECIPE_KEY}")
    return info


def fold_record(job: FoldJob, base: dict[str, Any], adapters: Sequence[Adapter], changed: list[str],
                notes: list[str], config_changes: dict[str, Any]) -> dict[str, Any]:
    """The whole record of a fold, as ``loramerge.json`` holds it."""
    record: dict[str, Any] = {
        "tool": "loramerge",
        "version": __version__,
        "command": "fold",
        "base": base,
        "adapters": [
            {"source": a.source, "base_model": a.base_model, "weight": w, "modules": len(a), "files": source_fingerprint(a),
             **({"block_weights": a.config["block_weights"]} if "block_weights" in a.config else {})}
            for a, w in zip(adapters, job.weights)
        ],
        "method": job.method,
        "parameters": {**job.policy.as_dict(), "seed": job.seed, **job.params},
        "dtype": dtype_name(job.out_dtype) if job.out_dtype is not None else "keep",
        "shard_size": job.shard_limit,
        "tied_embeddings": job.tied_mode,
        "config_changes": config_changes,
        "changed_tensors": changed,
        "notes": notes,
    }
    if job.merge_report is not None:
        record["merge"] = {"totals": job.merge_report.totals()}
    return record


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``loramerge.json`` into ``folder``."""
    (folder / RECIPE_NAME).write_text(json.dumps(record, indent=2) + "\n")


def single_file_metadata(metadata: dict[str, str], record: dict[str, Any]) -> dict[str, str]:
    """A folded single file's metadata: the base's, less hashes of its old bytes, plus the record.

    Example:
        >>> single_file_metadata({"modelspec.title": "x", "modelspec.hash_sha256": "0x12"}, {"tool": "loramerge"})
        {'modelspec.title': 'x', 'loramerge': '{"tool": "loramerge"}'}
    """
    kept = {k: v for k, v in metadata.items() if "hash" not in k.lower() and k != RECIPE_KEY}
    kept[RECIPE_KEY] = json.dumps(record)
    return kept
