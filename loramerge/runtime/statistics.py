"""Activation statistics for data-aware methods: each adapted Linear layer's input Gram, per source.

For source i, the base model runs with source i's adapter applied on task i's rows (prompt and
completion tokens together; a multiple-choice row with its right answer), and a forward pre-hook
on every Linear layer that any source adapts accumulates Σ x·xᵀ over the non-padding token
positions. G = that sum ÷ the number of positions. One pass over the data per source.

With a cache folder, each source's Grams are written to ``<folder>/<key>.safetensors``, the key
being a hash of the base model's files (names, sizes, modification times and config), the
adapter's factors, the data rows and the module list; a later merge with the same inputs reads
them back without loading the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loramerge.core.adapter import Adapter
from loramerge.core.devices import parse_dtype
from loramerge.errors import CorruptFile, InvalidParameter
from loramerge.io.formats.tensorfile import read_json_object, read_safetensors, write_safetensors
from loramerge.io.output import atomic_output
from loramerge.io.sources import resolve_model
from loramerge.io.structured import read_text
from loramerge.merge.statistics import InputStatistics
from loramerge.runtime.data import DataSpec, Task, load_task
from loramerge.runtime.encoding import Encoded, encode_task
from loramerge.runtime.resident import Runtime
from loramerge.runtime.scoring import batches, forward_logits, pad_right

CACHE_VERSION = "1"


def union_modules(adapters: Sequence[Adapter]) -> dict[str, Adapter]:
    """Every module any adapter has, in first-seen order, with the first adapter that has it."""
    out: dict[str, Adapter] = {}
    for adapter in adapters:
        for module in adapter.layers:
            out.setdefault(module, adapter)
    return out


def linear_modules(adapters: Sequence[Adapter]) -> list[str]:
    """The modules (of any adapter) whose updates are Linear: the layers RegMean regresses."""
    return [m for m, owner in union_modules(adapters).items() if owner.layers[m].kind == "linear"]


def gram_sequences(task: Task, encoded: Sequence[Encoded]) -> list[Encoded]:
    """One sequence per row: the row itself, or for multiple choice the prompt with its right answer."""
    return [e for e in encoded if e.choice < 0 or e.choice == int(task.rows[e.row].data["answer"])]


def collect_grams(runtime: Runtime, adapter: Adapter, task: Task, modules: Sequence[str], *, layout: Adapter,
                  batch_size: int = 8, progress: bool = False, label: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """``({module: G}, tokens)`` for ``modules`` while ``adapter`` is applied, over ``task``'s tokens.

    ``layout`` is an adapter that has every module of ``modules`` (their union): it says where
    each one sits in the model. Grams are float32, accumulated in float64.
    """
    placements = runtime.placements(layout.with_layers({m: layout.layers[m] for m in modules}))
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None}
    handles = []
    for module in modules:
        target = placements[module].target
        size = layout.layers[module].matrix_shape[1]

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], *, name: str = module, width: int = size) -> None:
            x = args[0].reshape(-1, width)[state["mask"]].double()
            total = sums.get(name)
            product = x.T @ x
            sums[name] = product if total is None else total.add_(product)

        handles.append(runtime.model.get_submodule(target).register_forward_pre_hook(hook))
    encoded = gram_sequences(task, encode_task(task, runtime.tokenizer, runtime.context_length()))
    pad = runtime.tokenizer.pad_token_id if runtime.tokenizer.pad_token_id is not None else 0
    tokens = 0
    try:
        with runtime.applied(adapter), torch.inference_mode():
            for group in tqdm(batches(encoded, batch_size), desc=label or f"statistics: {task.name}", unit="batch",
                              disable=True if not progress else None, leave=False):
                ids, mask = pad_right([encoded[i].ids for i in group], pad)
                state["mask"] = mask.reshape(-1).bool().to(runtime.device)
                tokens += int(mask.sum())
                forward_logits(runtime.model, ids.to(runtime.device), mask.to(runtime.device), runtime.kind)
    finally:
        for handle in handles:
            handle.remove()
    missing = [m for m in modules if m not in sums]
    if missing:
        raise InvalidParameter(f"module {missing[0]} never ran on {task.source}; RegMean needs its inputs")
    return {m: (sums[m] / tokens).float().cpu() for m in modules}, tokens


# ---------------------------------------------------------------------------------------- caching


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def base_fingerprint(folder: Path) -> str:
    """A hash of a model folder's file names, sizes and modification times, and its config."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    config = read_text(folder / "config.json") if (folder / "config.json").is_file() else ""
    return _digest({"files": listing, "config": config})


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder loads in by default: its config's ``torch_dtype`` (or ``dtype``), else float32."""
    config = read_json_object(folder / "config.json") if (folder / "config.json").is_file() else {}
    named = config.get("torch_dtype") or config.get("dtype")
    try:
        return parse_dtype(named) or torch.float32 if isinstance(named, str) else torch.float32
    except InvalidParameter:
        return torch.float32


def adapter_fingerprint(adapter: Adapter) -> str:
    """A hash of an adapter's factors and scales (what the statistics depend on)."""
    digest = hashlib.sha256()
    for module, lowrank in adapter.layers.items():
        digest.update(f"{module}:{lowrank.scale}:{lowrank.kind}:{lowrank.fan_in_fan_out}".encode())
        for tensor in (lowrank.A, lowrank.B):
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def task_fingerprint(task: Task) -> str:
    return _digest([dict(row.data) for row in task.rows])


def cache_key(base: str, adapter: Adapter, task: Task, modules: Sequence[str], dtype: str | None) -> str:
    return _digest({"version": CACHE_VERSION, "base": base, "adapter": adapter_fingerprint(adapter),
                    "data": task_fingerprint(task), "modules": list(modules), "dtype": dtype})[:32]


def _read_cached(file: Path, modules: Sequence[str]) -> tuple[dict[str, torch.Tensor], int] | None:
    if not file.is_file():
        return None
    tensors, metadata = read_safetensors(file)
    missing = [m for m in modules if m not in tensors]
    if missing:
        raise CorruptFile(f"{file}: cached statistics lack module {missing[0]}; delete the file to collect them again")
    return {m: tensors[m] for m in modules}, int(metadata.get("tokens", 0))


def _write_cached(file: Path, grams: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(file, force=True, directory=False) as tmp:
        write_safetensors(grams, tmp, metadata=metadata)


def input_statistics(
    base: str | Path | Runtime,
    adapters: Sequence[Adapter],
    data: Sequence[DataSpec],
    *,
    cache: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
) -> InputStatistics:
    """The input Grams of every Linear module any adapter has, one data set per adapter, in order.

    ``base`` is a model folder or Hub id (loaded only if some source's statistics are not in
    ``cache``) or a :class:`Runtime`. ``data[i]`` is source i's task.
    """
    if len(data) != len(adapters):
        raise InvalidParameter(f"got {len(data)} data file(s) for {len(adapters)} source(s); give one --data per "
                               "source, in the same order")
    tasks = [load_task(spec, limit=limit) for spec in data]
    modules = linear_modules(adapters)
    owners = union_modules(adapters)
    layout = Adapter({m: owners[m].layers[m] for m in modules})
    runtime = base if isinstance(base, Runtime) else None
    folder = Path(cache) if cache is not None else None
    keys: list[str | None] = [None] * len(adapters)
    if folder is not None:
        model_folder = resolve_model(base) if runtime is None else runtime.folder  # type: ignore[arg-type]
        if model_folder is not None:
            loaded = runtime.dtype if runtime is not None else parse_dtype(dtype) or checkpoint_dtype(model_folder)
            keys = [cache_key(base_fingerprint(model_folder), a, t, modules, str(loaded))
                    for a, t in zip(adapters, tasks)]
    grams: list[dict[str, torch.Tensor]] = []
    tokens: list[int] = []
    for i, (adapter, task) in enumerate(zip(adapters, tasks)):
        key = keys[i]
        cached = _read_cached(folder / f"{key}.safetensors", modules) if folder is not None and key else None
        if cached is None:
            if runtime is None:
                runtime = Runtime.load(base, device=device, dtype=dtype, allow_pickle=allow_pickle)  # type: ignore[arg-type]
            cached = collect_grams(runtime, adapter, task, modules, layout=layout, batch_size=batch_size,
                                   progress=progress, label=f"statistics {i + 1}/{len(adapters)}: {task.name}")
            if folder is not None and key:
                _write_cached(folder / f"{key}.safetensors", cached[0],
                              {"tokens": str(cached[1]), "task": task.name, "source": str(task.source),
                               "adapter": adapter.source or "", "loramerge_statistics": CACHE_VERSION})
        grams.append(cached[0])
        tokens.append(cached[1])
    return InputStatistics(grams, tokens)
