"""Folding adapters into a base model's weights, streamed tensor by tensor.

``fold(base, adapters, output=...)`` writes a new model folder: the same tensor names, sharding
(or ``shard_size``) and dtypes (or ``dtype``), a rewritten index, every non-weight file copied,
and a ``loramerge.json`` with the recipe and the sources' fingerprints. Two image-generation
bases are handled too: a single-file ``.safetensors`` checkpoint (SD/SDXL/Flux; written as one
file, recipe in its metadata; names resolved by :mod:`loramerge.io.single_file`, where q/k/v may be
row slices of a fused weight) and a diffusers pipeline folder (each touched component folded as
its own model folder).

What is added to each weight, in float32 and rounded once to the stored dtype (PEFT's
``merge_and_unload``, see reference/peft.md §3):

- LoRA: W ← W + w·s·B@A, transposed for GPT-2 Conv1D and embeddings (orientation checked
  against the base tensor's shape), reshaped for convolutions.
- DoRA: W ← W + w·(m/‖W₀ + ΔW‖ ⊙ (W + ΔW) − W), the norm taken per output channel against the
  unmerged weight W₀. With w = 1 this is PEFT's sequential fold; 0 < w < 1 moves part of the way.
- ``lora_bias``: b ← b + w·s·b_B. Full weights (``modules_to_save``, trained biases) replace the
  tensor (w = 1) or interpolate towards it.

Several adapters with ``linear``/``cat`` and no rank option are folded one after another, which
is their exact sum (and PEFT's semantics for DoRA); any other method merges them first with
:func:`loramerge.merge.engine` and folds the result.

Memory: a tensor with plain updates is streamed in row blocks from the input file to the output
file, so the resident memory is a few blocks and the adapters, never a shard. A DoRA weight is
held whole (its norms need every row).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from loramerge._version import __version__
from loramerge.core.adapter import Adapter, LowRank
from loramerge.core.devices import dtype_name, one_core_spare, parse_dtype, resolve_device
from loramerge.core.rank import RankPolicy
from loramerge.core.report import MergeReport
from loramerge.errors import (
    IncompatibleAdapters,
    InvalidParameter,
    LoramergeError,
    LoramergeWarning,
    NonFiniteValues,
    SourceNotFound,
    UnsupportedAdapter,
    WriteFailed,
)
from loramerge.io.checkpoint import (
    FLOAT_CODES,
    WEIGHT_SUFFIXES,
    Checkpoint,
    OutEntry,
    ShardWriter,
    TensorInfo,
    dtype_code,
    iter_plain_files,
    open_checkpoint,
    pack_shards,
    parse_size,
    safetensors_name,
    shard_names,
)
from loramerge.io.formats.tensorfile import read_json_object
from loramerge.io.names import (
    Resolver,
    ResolverResult,
    as_targets,
    hf_resolver,
    nearest,
    stored_transposed,
    tied_embeddings,
)
from loramerge.io.output import atomic_output, check_output
from loramerge.io.sources import load, resolve_model
from loramerge.merge.engine import merge

RECIPE_NAME = "loramerge.json"
RECIPE_KEY = "loramerge"  # metadata key of the recipe in a folded single file
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder: one model folder per component
TIED_MODES = ("refuse", "untie", "shared")
# Elements per block of maths and per write: 2 MB of float32. Small blocks stay in cache between
# the conversion, the update and the writer's copy; on the 3.2 GB benchmark 512K-element blocks
# folded in 4.6-5.6 s against 5.8-7.3 s at 1M, 6.4-9.5 s at 2M and 11-13 s at 32M.
_BLOCK_ELEMENTS = 1 << 19
_FOLD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

UpdateKind = Literal["lora", "dora", "bias", "replace"]


@dataclass
class Update:
    """One contribution to one base tensor, in the order it is applied."""

    kind: UpdateKind
    source: str
    module: str
    weight: float = 1.0
    lowrank: LowRank | None = None
    transposed: bool = False
    tensor: torch.Tensor | None = None
    rows: tuple[int, int, int] | None = None  # (source, start, size): update rows → tensor rows; None: whole


@dataclass
class FoldResult:
    """What a fold wrote: the output folder, the tensors it changed and the recipe it recorded."""

    path: Path
    changed: list[str]
    modules: int
    shards: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    merge_report: MergeReport | None = None

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds else float("inf")
        return (
            f"wrote {self.path}: {self.modules} module update(s) in {len(self.changed)} tensor(s), "
            f"{self.shards} shard(s), {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f}s ({rate:.2f} GB/s)"
        )


def fold(
    base: str | Path,
    adapters: Adapter | str | Path | Sequence[Adapter | str | Path],
    *,
    output: str | Path,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    rank_max: int | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = "keep",
    shard_size: str | int | None = None,
    device: str | torch.device = "auto",
    compute_dtype: str | torch.dtype = "fp32",
    tied_embeddings_mode: str = "refuse",
    force: bool = False,
    strict: bool = False,
    allow_pickle: bool = False,
    ignore_base_mismatch: bool = False,
    resolver: Resolver | None = None,
    progress: bool = False,
    **params: Any,
) -> FoldResult:
    """Fold one or more adapters into the base model at ``base`` and write the model to ``output``.

    ``base`` is a model folder (written as a folder), or a single-file ``.safetensors`` checkpoint
    (SD 1.x/2.x, SDXL, Flux.1 …, written as one ``.safetensors`` file at ``output`` with the same
    tensor names, order, dtypes and metadata, plus the recipe under the ``loramerge`` metadata key).
    ``resolver`` maps module paths to tensor names (:data:`~loramerge.io.names.Resolver`); by default
    :func:`~loramerge.io.names.hf_resolver` for a folder and a
    :class:`~loramerge.io.single_file.SingleFileResolver` for a single file.

    ``weights`` (one per adapter, default 1; negative subtracts a LoRA) scale each adapter. With
    several adapters, ``method`` and the rank options are those of :func:`loramerge.merge.engine`.
    ``dtype`` is ``"keep"`` or fp32/fp16/bf16 for every floating tensor; ``shard_size`` (``"5GB"``)
    re-shards. ``tied_embeddings_mode`` says what to do when an adapter changes one of two tied
    embeddings: ``refuse`` (default), ``untie`` (write both, set ``tie_word_embeddings: false``:
    the adapted model exactly) or ``shared`` (fold into the shared matrix, as PEFT does).
    ``strict`` refuses an adapter trained on another base model instead of warning.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import Adapter, LowRank
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> from loramerge.io.checkpoint import open_checkpoint
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "base").mkdir()
        >>> write_safetensors({"fc.weight": torch.zeros(4, 3)}, root / "base" / "model.safetensors")
        >>> ad = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2), scale=0.5)})
        >>> result = fold(root / "base", ad, output=root / "out", weights=[2.0])
        >>> open_checkpoint(root / "out").read("fc.weight")[0].tolist()
        [2.0, 2.0, 2.0]
    """
    started = time.perf_counter()
    check_output(output, force=force)
    sources = _as_list(adapters)
    if not sources:
        raise InvalidParameter("no adapters to fold")
    if weights is not None and len(weights) != len(sources):
        raise InvalidParameter(f"got {len(weights)} weight(s) for {len(sources)} adapter(s); give one per adapter")
    weight_list = [float(w) for w in weights] if weights is not None else [1.0] * len(sources)
    if not all(math.isfinite(w) for w in weight_list):
        raise NonFiniteValues(f"weights must be finite, got {weight_list}")
    if tied_embeddings_mode not in TIED_MODES:
        raise InvalidParameter(f"tied_embeddings_mode must be one of {', '.join(TIED_MODES)}, got {tied_embeddings_mode!r}")
    out_dtype = _fold_dtype(dtype)
    compute = parse_dtype(compute_dtype) or torch.float32
    shard_limit = parse_size(shard_size)
    target = resolve_device(device)

    base_path = Path(base).expanduser()
    single = base_path.is_file()
    if single and shard_limit is not None:
        raise InvalidParameter(f"{base}: a single-file checkpoint is written as one file; drop --shard-size")
    folder = base_path if single else resolve_model(base)
    pipeline = not single and (folder / PIPELINE_INDEX).is_file()
    loaded = [load(s, allow_pickle=allow_pickle) for s in sources]
    ckpt: Checkpoint | None = None
    if pipeline:
        index = read_json_object(folder / PIPELINE_INDEX)
        notes = _check_bases(loaded, folder, {"_name_or_path": index.get("_name_or_path")}, strict)
        families, described = _pipeline_family(index), f"a diffusers {index.get('_class_name', 'pipeline')} folder"
    else:
        ckpt = open_checkpoint(folder, allow_pickle=allow_pickle)
        notes = _check_bases(loaded, folder, ckpt.config, strict)
        if resolver is None:
            resolver = default_resolver(ckpt)
        family = getattr(resolver, "family", None)
        families, described = ([family] if family else None), getattr(resolver, "describe", lambda: "")()
    if not ignore_base_mismatch:
        _check_family(loaded, families, f"{folder} is {described}")

    policy = RankPolicy(rank=rank, energy=energy, max_error=max_error, rank_max=rank_max)
    merge_report = None
    if _sequential(method, policy, params):
        units = list(zip(loaded, weight_list))
    else:
        try:
            merged = merge(loaded, method=method, weights=weight_list, rank=rank, energy=energy, max_error=max_error,
                           rank_max=rank_max, seed=seed, device=target, dtype=torch.float32, compute_dtype=compute,
                           ignore_base_mismatch=ignore_base_mismatch, progress=progress, **params)
        except UnsupportedAdapter as exc:
            raise UnsupportedAdapter(f"{exc}; fold such adapters with --method linear and no rank option, "
                                     "which applies them one after another") from None
        merge_report = merged.report
        units = [(merged, 1.0)]
    job = _Job(Path(output), force, weight_list, method, policy, seed, params, out_dtype, shard_limit,
               tied_embeddings_mode, compute, target, progress, merge_report)

    try:
        if pipeline:
            return _fold_pipeline(folder, index, units, loaded, job, resolver, allow_pickle, notes, started)
        assert ckpt is not None and resolver is not None
        plan = plan_fold(ckpt, units, resolver=resolver, tied_mode=tied_embeddings_mode)
        layout = _layout(ckpt, plan, out_dtype, shard_limit)
        _check_space(Path(output), layout)
        if single:
            recipe = _recipe(job, _base_info(folder, ckpt), loaded, sorted(plan.updates), plan.notes, {})
            layout[0].metadata = single_file_metadata(layout[0].metadata, recipe)
            with atomic_output(output, force=force, directory=False) as tmp:
                written = _write_model(ckpt, plan, layout, tmp.parent, compute, target, progress, file=tmp)
        else:
            with atomic_output(output, force=force) as tmp:
                written = _write_model(ckpt, plan, layout, tmp, compute, target, progress, shard_limit is None)
                config_changes = _write_config(ckpt, tmp, out_dtype, plan.untie)
                for path in iter_plain_files(folder, ckpt.weight_files | {"config.json", RECIPE_NAME}):
                    dest = tmp / path.relative_to(folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest)
                recipe = _recipe(job, _base_info(folder, ckpt), loaded, sorted(plan.updates), plan.notes,
                                 config_changes)
                (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
    except LoramergeError:  # several are OSErrors too (WriteFailed, OutputExists, ...): already one line
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise WriteFailed(f"{output}: no space left on the device while writing the folded model; "
                              "nothing was written") from None
        raise WriteFailed(f"{output}: could not write the folded model ({exc.strerror or exc}); "
                          "nothing was written") from None
    finally:
        if ckpt is not None:
            ckpt.release()
    return FoldResult(
        path=Path(output), changed=sorted(plan.updates), modules=plan.module_count, shards=len(layout),
        bytes_written=written, seconds=time.perf_counter() - started, warnings=notes + plan.notes,
        recipe=recipe, merge_report=merge_report,
    )


@dataclass
class _Job:
    """The settings of one fold, as the writers and the recipe need them."""

    output: Path
    force: bool
    weights: list[float]
    method: str
    policy: RankPolicy
    seed: int
    params: dict[str, Any]
    out_dtype: torch.dtype | None
    shard_limit: int | None
    tied_mode: str
    compute: torch.dtype
    device: torch.device
    progress: bool
    merge_report: MergeReport | None


# ---------------------------------------------------------------------------------- pipelines


def _pipeline_family(index: dict[str, Any]) -> list[str] | None:
    """The architectures a diffusers pipeline class stands for (None: one the name tables do not cover)."""
    name = str(index.get("_class_name", ""))
    if name.startswith("StableDiffusionXL"):
        return ["sdxl"]
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return ["sd1", "sd2"]
    if name.startswith("Flux"):
        return ["flux"]
    return None


def pipeline_components(folder: Path, index: dict[str, Any]) -> list[str]:
    """The components of a diffusers pipeline folder that are model folders (have a config.json).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("unet", "scheduler"):
        ...     (root / name).mkdir()
        >>> _ = (root / "unet" / "config.json").write_text("{}")
        >>> pipeline_components(root, {"_class_name": "X", "unet": ["diffusers", "U"], "scheduler": ["diffusers", "S"]})
        ['unet']
    """
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and (folder / name / "config.json").is_file()]


def component_resolver(path: str, names: Collection[str]) -> ResolverResult:
    """:func:`~loramerge.io.names.hf_resolver` inside one pipeline component, with or without CLIP's ``text_model.``.

    Example:
        >>> component_resolver("text_model.encoder.layers.0.mlp.fc1.weight", {"encoder.layers.0.mlp.fc1.weight"})
        'encoder.layers.0.mlp.fc1.weight'
    """
    found = hf_resolver(path, names)
    if found is None:
        other = path.removeprefix("text_model.") if path.startswith("text_model.") else "text_model." + path
        found = hf_resolver(other, names)
    return found


def split_by_component(adapter: Adapter, components: Sequence[str], where: Path) -> dict[str, Adapter]:
    """The adapter's modules per pipeline component, named inside the component (``unet.x`` → ``x``).

    Example:
        >>> ad = Adapter({"unet.fc": LowRank(torch.ones(1, 2), torch.ones(3, 1))})
        >>> {c: a.modules for c, a in split_by_component(ad, ["unet", "vae"], Path("p")).items()}
        {'unet': ['fc']}
    """
    parts: dict[str, tuple[dict[str, LowRank], dict[str, torch.Tensor]]] = {}

    def owner(name: str) -> tuple[str, str]:
        component, _, rest = name.partition(".")
        if component not in components or not rest:
            raise IncompatibleAdapters(
                f"{adapter.source or 'adapter'}: module {name} belongs to no model of the pipeline {where} "
                f"({', '.join(components)})"
            )
        return component, rest

    for module, lowrank in adapter.layers.items():
        component, rest = owner(module)
        parts.setdefault(component, ({}, {}))[0][rest] = lowrank
    for key, value in adapter.full_weights.items():
        component, rest = owner(key)
        parts.setdefault(component, ({}, {}))[1][rest] = value
    return {c: replace(adapter, layers=layers, full_weights=full) for c, (layers, full) in parts.items()}


def _fold_pipeline(folder: Path, index: dict[str, Any], units: Sequence[tuple[Adapter, float]],
                   loaded: Sequence[Adapter], job: _Job, resolver: Resolver | None, allow_pickle: bool,
                   notes: list[str], started: float) -> FoldResult:
    """Fold into a diffusers pipeline folder: each touched component folded as its own model folder.

    Components no adapter touches are copied as they are (converted when ``dtype`` asks for it);
    scheduler, tokenizer and other files are copied; ``loramerge.json`` sits at the top.
    """
    components = pipeline_components(folder, index)
    per_component: dict[str, list[tuple[Adapter, float]]] = {}
    for adapter, weight in units:
        for component, part in split_by_component(adapter, components, folder).items():
            per_component.setdefault(component, []).append((part, weight))
    opened: dict[str, Checkpoint] = {}
    plans: dict[str, FoldPlan] = {}
    layouts: dict[str, list[OutShard]] = {}
    kept: list[str] = []
    for component in components:
        touched = component in per_component
        if not touched and job.out_dtype is None:
            kept.append(component)
            continue
        try:
            ckpt = open_checkpoint(folder / component, allow_pickle=allow_pickle)
        except SourceNotFound:
            if touched:
                raise
            kept.append(component)  # no weights this tool reads (variants only, say): copied untouched
            notes.append(f"{component}: weights kept as they are (not in a layout fold reads)")
            continue
        opened[component] = ckpt
        plans[component] = plan_fold(ckpt, per_component.get(component, []), resolver=resolver or component_resolver,
                                     tied_mode=job.tied_mode)
        layouts[component] = _layout(ckpt, plans[component], job.out_dtype, job.shard_limit)
    _check_space(job.output, [shard for layout in layouts.values() for shard in layout])
    changed = sorted(f"{c}.{name}" for c, plan in plans.items() for name in plan.updates)
    plan_notes = [f"{c}: {note}" for c, plan in plans.items() for note in plan.notes]
    written = 0
    config_changes: dict[str, Any] = {}
    try:
        with atomic_output(job.output, force=job.force) as tmp:
            for component, ckpt in opened.items():
                (tmp / component).mkdir()
                written += _write_model(ckpt, plans[component], layouts[component], tmp / component, job.compute,
                                        job.device, job.progress, job.shard_limit is None)
                change = _write_config(ckpt, tmp / component, job.out_dtype, plans[component].untie)
                if change:
                    config_changes[component] = change
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if not path.is_file() or any(p.startswith(".") for p in rel.parts) or rel.as_posix() == RECIPE_NAME:
                    continue
                component = rel.parts[0] if len(rel.parts) > 1 else ""
                if component in opened and (rel.parts[1:] == ("config.json",) or path.name.endswith(WEIGHT_SUFFIXES)
                                            or path.name.endswith(".index.json")):
                    if path.name not in opened[component].weight_files and rel.parts[1:] != ("config.json",):
                        plan_notes.append(f"{rel}: left out (not the weights that were folded)")
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            info = {"source": str(folder), "name_or_path": index.get("_name_or_path"),
                    "files": {PIPELINE_INDEX: file_sha256(folder / PIPELINE_INDEX)},
                    "shards": {f"{c}/{p.name}": p.stat().st_size for c, ck in opened.items() for p in ck.shards},
                    "kept": kept}
            recipe = _recipe(job, info, loaded, changed, plan_notes, config_changes)
            (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
    finally:
        for ckpt in opened.values():
            ckpt.release()
    return FoldResult(
        path=job.output, changed=changed, modules=sum(p.module_count for p in plans.values()),
        shards=sum(len(layout) for layout in layouts.values()), bytes_written=written,
        seconds=time.perf_counter() - started, warnings=notes + plan_notes, recipe=recipe,
        merge_report=job.merge_report,
    )


def default_resolver(ckpt: Checkpoint) -> Resolver:
    """The resolver for a base: :func:`~loramerge.io.names.hf_resolver` for a model folder, the same inside
    the component for a diffusers UNet/transformer folder (``unet.x`` → ``x``), and for a single file
    a :class:`~loramerge.io.single_file.SingleFileResolver` built from its tensors.

    Example:
        >>> import tempfile
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"fc.weight": torch.zeros(4, 3)}, folder / "model.safetensors")
        >>> default_resolver(open_checkpoint(folder)) is hf_resolver
        True
        >>> _ = (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
        >>> default_resolver(open_checkpoint(folder))("unet.fc.weight", {"fc.weight"})
        'fc.weight'
    """
    if ckpt.file is not None:
        from loramerge.io.single_file import SingleFileResolver

        return SingleFileResolver({name: info.shape for name, info in ckpt.tensors.items()})
    component = diffusers_component(ckpt.config)
    return hf_resolver if component is None else partial(_inside_component, component)


def diffusers_component(config: dict[str, Any]) -> str | None:
    """The pipeline component a diffusers model folder's config names (``unet``, ``transformer``), if any.

    Example:
        >>> diffusers_component({"_class_name": "FluxTransformer2DModel"}), diffusers_component({"model_type": "llama"})
        ('transformer', None)
    """
    name = str(config.get("_class_name", ""))
    if name.startswith("UNet2DConditionModel"):
        return "unet"
    if name.endswith("Transformer2DModel"):
        return "transformer"
    return None


def _inside_component(component: str, path: str, names: Collection[str]) -> ResolverResult:
    if path.startswith(component + "."):
        return component_resolver(path[len(component) + 1:], names)
    return hf_resolver(path, names)


def _check_family(adapters: Sequence[Adapter], families: Sequence[str] | None, described: str) -> None:
    """Refuse an image-generation LoRA for one architecture folded into a model of another."""
    from loramerge.io.formats.sd_names import ARCHITECTURES

    if not families:
        return
    for adapter in adapters:
        recorded = [a for a in adapter.config.get("architectures") or [] if a in ARCHITECTURES]
        if recorded and not set(recorded) & set(families):
            labels = "/".join(ARCHITECTURES[a].label for a in recorded)
            raise IncompatibleAdapters(
                f"{adapter.source or 'adapter'} is a LoRA for {labels}, but {described}; "
                "pass --ignore-base-mismatch to fold it anyway"
            )


def single_file_metadata(metadata: dict[str, str], recipe: dict[str, Any]) -> dict[str, str]:
    """A folded single file's metadata: the base's, less hashes of its old bytes, plus the recipe.

    Example:
        >>> single_file_metadata({"modelspec.title": "x", "modelspec.hash_sha256": "0x12"}, {"tool": "loramerge"})
        {'modelspec.title': 'x', 'loramerge': '{"tool": "loramerge"}'}
    """
    kept = {k: v for k, v in metadata.items() if "hash" not in k.lower() and k != RECIPE_KEY}
    kept[RECIPE_KEY] = json.dumps(recipe)
    return kept


def _as_list(adapters: Adapter | str | Path | Sequence[Adapter | str | Path]) -> list[Adapter | str | Path]:
    if isinstance(adapters, (Adapter, str, Path)):
        return [adapters]
    return list(adapters)


def _fold_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "keep"):
        return None
    parsed = parse_dtype(dtype)
    if parsed not in _FOLD_DTYPES.values():
        raise InvalidParameter(f"dtype must be keep, fp32, fp16 or bf16, got {dtype!r}")
    return parsed


def _sequential(method: str, policy: RankPolicy, params: dict[str, Any]) -> bool:
    """True when folding the adapters one after another is exactly what ``method`` asks for."""
    from loramerge.merge.methods import canonical_name

    return canonical_name(method) in ("linear", "cat") and policy.is_exact and not params


# --------------------------------------------------------------------------------------------- plan


@dataclass
class FoldPlan:
    """Every base tensor to change, with its updates in order; extra tensors an untie adds."""

    updates: dict[str, list[Update]]
    extra: dict[str, str]
    untie: bool
    module_count: int
    notes: list[str] = field(default_factory=list)


def plan_fold(ckpt: Checkpoint, units: Sequence[tuple[Adapter, float]], *, resolver: Resolver = hf_resolver,
              tied_mode: str = "refuse") -> FoldPlan:
    """Resolve every adapter module to a base tensor and check shapes, orientation, dtypes and ties.

    Nothing is read but headers; every refusal happens here, before any output exists.

    Example:
        >>> import tempfile
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"model.fc.weight": torch.zeros(4, 3)}, folder / "model.safetensors")
        >>> ad = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2))})
        >>> plan = plan_fold(open_checkpoint(folder), [(ad, 1.0)])
        >>> [(name, [u.kind for u in ups]) for name, ups in plan.updates.items()]
        [('model.fc.weight', ['lora'])]
    """
    names = set(ckpt.tensors)
    tie = tied_embeddings(ckpt.config, names)
    virtual = {tie[1]} if tie and tie[1] not in names else set()
    lookup = names | virtual
    updates: dict[str, list[Update]] = {}
    count = 0
    for adapter, weight in units:
        label = adapter.source or "adapter"
        # Full weights first: PEFT loads them into the base layers before it merges the LoRA updates
        # (an adapter that targets lm_head saves the base lm_head weight itself).
        for key, value in adapter.full_weights.items():
            what = "full weight (modules_to_save / bias)"
            _check_weight_for_full(weight, label, key, "a full replacement weight")
            for tensor, rows, _ in _place(ckpt, resolver, key, lookup, tie, tuple(value.shape), False, label, key, what):
                owners = [u.source for u in updates.get(tensor, []) if u.kind == "replace" and u.rows == rows
                          and u.tensor is not None and not torch.equal(u.tensor, value)]
                if owners:
                    raise IncompatibleAdapters(
                        f"{label} and {owners[0]} both replace {tensor} (modules_to_save); fold them one at a time"
                    )
                updates.setdefault(tensor, []).append(Update("replace", label, key, weight, tensor=value, rows=rows))
            count += 1
        for module, lr in adapter.layers.items():
            kind: UpdateKind = "dora" if lr.magnitude is not None else "lora"
            if kind == "dora":
                _check_weight_for_full(weight, label, module, "a DoRA update")
            for tensor, rows, transposed in _place(ckpt, resolver, f"{module}.weight", lookup, tie, lr, lr.kind == "linear",
                                                   label, module, "module"):
                if kind == "dora":
                    _check_magnitude(lr, transposed, tensor, label, module)
                updates.setdefault(tensor, []).append(Update(kind, label, module, weight, lr, transposed, rows=rows))
            count += 1
            if lr.bias is not None:
                bias = lr.bias.float() * lr.scale
                for tensor, rows, _ in _place(ckpt, resolver, f"{module}.bias", names, None, tuple(bias.shape), False,
                                              label, module, "bias (lora_bias)"):
                    updates.setdefault(tensor, []).append(Update("bias", label, module, weight, tensor=bias, rows=rows))
    for tensor in updates:
        info = ckpt.tensors.get(tensor) or ckpt.tensors[tie[0]]  # type: ignore[index]
        if info.dtype not in FLOAT_CODES:
            raise UnsupportedAdapter(
                f"{ckpt.folder}: tensor {tensor} is stored as {info.dtype}; folding into quantized or integer "
                "weights is not supported (dequantize the base model first)"
            )
    plan = FoldPlan(updates, {}, False, count)
    if tie is not None:
        _apply_tie(plan, tie, names, tied_mode, ckpt)
    return plan


def _place(ckpt: Checkpoint, resolver: Resolver, path: str, lookup: set[str], tie: tuple[str, str] | None,
           update: LowRank | tuple[int, ...], may_transpose: bool, label: str, module: str, what: str
           ) -> list[tuple[str, tuple[int, int, int] | None, bool]]:
    """Where ``update`` (a LoRA, or a tensor of the given shape) goes: ``(tensor, rows, transposed)`` per target.

    ``rows`` is ``(source, start, size)`` for a row slice (q/k/v inside a fused weight), None for
    the whole tensor. A plain tensor name from the resolver is checked against the shape, with the
    orientation decided as for Hugging Face checkpoints; :class:`~loramerge.io.names.Target` answers
    say it themselves. The slices must cover every row of the update.
    """
    found = resolver(path, lookup)
    targets = as_targets(found)
    missing = [t.name for t in targets or [] if t.name not in lookup]
    if targets is None or missing:
        suggest = getattr(resolver, "nearest", None)
        close = (suggest(path) if suggest is not None and not missing else []) or \
            nearest(missing[0] if missing else path, lookup)
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise IncompatibleAdapters(f"{label}: {what} {module} not found in the base model "
                                   f"(no tensor {missing[0] if missing else path}){hint}")
    lowrank = update if isinstance(update, LowRank) else None
    shape_of_update = tuple(lowrank.delta_shape) if lowrank is not None else tuple(update)  # type: ignore[arg-type]
    if isinstance(found, str):
        shape = _tensor_shape(ckpt, found, tie)
        if lowrank is None:
            _check_shape(shape, shape_of_update, label, module, found)
            return [(found, None, False)]
        return [(found, None, _orientation(found, shape, lowrank, ckpt.config, label, module))]
    out = shape_of_update[0] if shape_of_update else 1
    kind = f"a {lowrank.kind} update" if lowrank is not None else "a tensor"
    placed = []
    places = []
    covered = 0
    for target in targets:
        shape = _tensor_shape(ckpt, target.name, tie)
        source, start, size = target.rows(out)
        whole = target.start == 0 and target.source == 0 and target.size is None
        flip = target.transposed != (lowrank is not None and lowrank.transposed_in_base)
        if flip:
            fits = (may_transpose or (lowrank is not None and lowrank.transposed_in_base)) and whole and \
                len(shape) == 2 and lowrank is not None and tuple(shape) == lowrank.matrix_shape[::-1]
        else:
            fits = (source >= 0 and start >= 0 and size > 0 and source + size <= out and len(shape) >= 1
                    and start + size <= shape[0] and (not whole or out == shape[0])
                    and _same_trailing(tuple(shape[1:]), shape_of_update[1:]))
        where = "" if whole else f" (rows {start}:{start + size} for this module)"
        if not fits:
            raise IncompatibleAdapters(f"{label}: {what} {module} has {kind} of shape {shape_of_update} but base "
                                       f"tensor {target.name} has shape {tuple(shape)}{where}")
        rows = None if flip or (source == 0 and start == 0 and size == out == shape[0]) else (source, start, size)
        placed.append((target.name, rows, flip))
        places.append(f"{target.name} of shape {tuple(shape)}{where}")
        covered += size
    if covered != out:
        raise IncompatibleAdapters(f"{label}: {what} {module} has {kind} of shape {shape_of_update} but its place in "
                                   f"the base model holds {covered} of its {out} rows: {'; '.join(places)}")
    return placed


def _tensor_shape(ckpt: Checkpoint, tensor: str, tie: tuple[str, str] | None) -> tuple[int, ...]:
    if tensor in ckpt.tensors:
        return ckpt.tensors[tensor].shape
    assert tie is not None
    return ckpt.tensors[tie[0]].shape


def _orientation(tensor: str, shape: tuple[int, ...], lr: LowRank, config: dict[str, Any], label: str,
                 module: str) -> bool:
    if lr.kind == "linear" and len(shape) == 2:
        flipped = stored_transposed(tensor, shape, lr.matrix_shape, config, lr.fan_in_fan_out)
        if flipped is not None:
            return flipped
    elif tuple(shape) == tuple(lr.base_shape):
        return lr.transposed_in_base
    raise IncompatibleAdapters(
        f"{label}: module {module} has a {lr.kind} update of shape {tuple(lr.base_shape)} but base tensor "
        f"{tensor} has shape {tuple(shape)}"
    )


def _same_trailing(base: tuple[int, ...], update: tuple[int, ...]) -> bool:
    # A Linear update fits a 1×1 convolution and the other way round; other kernels must match.
    def core(dims: tuple[int, ...]) -> tuple[int, ...]:
        while len(dims) > 1 and dims[-1] == 1:
            dims = dims[:-1]
        return dims

    return base == update or core(base) == core(update)


def dora_axis(lr: LowRank) -> Literal["out", "in"] | None:
    """Which axis a DoRA magnitude normalises: ``out`` (PEFT: ``(out,)``, or ``(1, out, 1, 1)`` for a conv),
    ``in`` (old LyCORIS: ``(1, in[, 1, 1])``), or None when its size fits neither.

    A conv magnitude ``(1, c, 1, 1)`` with ``c`` equal to both channel counts is read as PEFT's.

    Example:
        >>> lr = LowRank(torch.ones(1, 3), torch.ones(4, 1), magnitude=torch.ones(1, 3))
        >>> dora_axis(lr), dora_axis(LowRank(torch.ones(1, 3), torch.ones(4, 1), magnitude=torch.ones(4)))
        ('in', 'out')
    """
    magnitude = lr.magnitude
    if magnitude is None:
        return None
    out = lr.delta_shape[0]
    inputs = lr.delta_shape[1] if len(lr.delta_shape) > 1 else 0
    if magnitude.ndim == 1:
        return "out" if magnitude.numel() == out else None
    if magnitude.ndim == 2 and lr.kind == "linear":  # PEFT's linear magnitude is 1-D
        return "in" if magnitude.shape[0] == 1 and magnitude.numel() == inputs else None
    if magnitude.numel() == out:
        return "out"
    return "in" if magnitude.shape[0] == 1 and magnitude.numel() == inputs else None


def _check_magnitude(lr: LowRank, transposed: bool, tensor: str, label: str, module: str) -> None:
    axis = dora_axis(lr)
    if axis == "out" or (axis == "in" and not transposed):
        return
    assert lr.magnitude is not None
    raise IncompatibleAdapters(
        f"{label}: module {module} has a DoRA magnitude of shape {tuple(lr.magnitude.shape)}, which fits neither the "
        f"output nor the input channels of its {tuple(lr.delta_shape)} update to {tensor}"
    )


def _check_shape(base: tuple[int, ...], got: tuple[int, ...], label: str, key: str, tensor: str) -> None:
    if tuple(base) != tuple(got):
        raise IncompatibleAdapters(f"{label}: {key} has shape {tuple(got)} but base tensor {tensor} has shape {tuple(base)}")


def _check_weight_for_full(weight: float, label: str, module: str, what: str) -> None:
    if weight < 0:
        raise InvalidParameter(
            f"{label}: module {module} is {what}, which is not additive and cannot be subtracted (weight {weight})"
        )


def _apply_tie(plan: FoldPlan, tie: tuple[str, str], names: set[str], mode: str, ckpt: Checkpoint) -> None:
    source, head = tie
    touched = [n for n in (source, head) if n in plan.updates]
    if not touched:
        return
    modules = sorted({u.module for n in touched for u in plan.updates[n]})
    if mode == "refuse":
        raise UnsupportedAdapter(
            f"{ckpt.folder}: {source} and {head} are tied (tie_word_embeddings) and the adapter changes "
            f"{', '.join(modules)}; pass --tied-embeddings untie to write both (the adapted model exactly, with "
            "tie_word_embeddings false) or --tied-embeddings shared to fold into the shared matrix as PEFT does"
        )
    if mode == "shared":
        combined = plan.updates.pop(source, []) + plan.updates.pop(head, [])
        for update in combined:
            if update.kind == "lora" and update.lowrank is not None and update.lowrank.kind == "linear":
                update.transposed = False  # lm_head is (vocab, dim), the embedding's own layout
        plan.updates[source] = combined
        if head in names:
            plan.updates[head] = list(combined)
        plan.notes.append(f"folded {', '.join(modules)} into the shared {source} (tie kept)")
        return
    plan.untie = True
    if head not in names:
        plan.extra[head] = source
        plan.updates.setdefault(head, [])
    plan.notes.append(f"untied {source} and {head}: the output stores both and sets tie_word_embeddings false")


def _check_bases(adapters: Sequence[Adapter], folder: Path, config: dict[str, Any], strict: bool) -> list[str]:
    notes = []
    for adapter in adapters:
        declared = adapter.base_model
        if not declared or _same_base(str(declared), folder, config):
            continue
        message = (f"{adapter.source or 'adapter'} was trained on {declared}, but the base model is {folder}"
                   + (f" ({config.get('_name_or_path')})" if config.get("_name_or_path") else ""))
        if strict:
            raise IncompatibleAdapters(message + "; drop --strict to fold it anyway")
        warnings.warn(message, LoramergeWarning, stacklevel=3)
        notes.append(message)
    return notes


def _same_base(declared: str, folder: Path, config: dict[str, Any]) -> bool:
    declared = declared.rstrip("/")
    known = {str(folder), str(folder.resolve()), folder.name, str(config.get("_name_or_path") or "").rstrip("/")}
    if declared in known or Path(declared).name == folder.name:
        return True
    if "models--" + declared.replace("/", "--") in str(folder.resolve()):
        return True
    try:
        return Path(declared).expanduser().resolve() == folder.resolve()
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- layout


@dataclass
class OutShard:
    name: str
    entries: list[OutEntry]
    sources: dict[str, TensorInfo]
    metadata: dict[str, str]


def _layout(ckpt: Checkpoint, plan: FoldPlan, out_dtype: torch.dtype | None, limit: int | None) -> list[OutShard]:
    """The output shards: the input's, with the same names, unless ``limit`` asks for new ones."""

    def entry(info: TensorInfo, name: str) -> OutEntry:
        code = dtype_code(out_dtype) if out_dtype is not None and info.is_float else info.dtype
        return OutEntry(name, code, info.shape)

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


def _check_space(output: Path, layout: list[OutShard]) -> None:
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


# -------------------------------------------------------------------------------------------- write


def _write_model(ckpt: Checkpoint, plan: FoldPlan, layout: list[OutShard], tmp: Path, compute: torch.dtype,
                 device: torch.device, progress: bool, keep_index: bool = True, file: Path | None = None) -> int:
    """Write the layout's shards into folder ``tmp`` (or its one shard to ``file``) and, when sharded, the index."""
    total = sum(e.nbytes for shard in layout for e in shard.entries)
    weight_map: dict[str, str] = {}
    written = 0
    buffers = _Buffers()
    with one_core_spare(), tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="fold", disable=not progress) as bar:
        for number, shard in enumerate(layout, 1):
            bar.set_postfix_str(f"shard {number}/{len(layout)}")
            with ShardWriter(file or tmp / shard.name, shard.entries, shard.metadata, background=True) as writer:
                for entry in shard.entries:
                    source = shard.sources[entry.name]
                    updates = plan.updates.get(entry.name)
                    if updates is None and entry.dtype == source.dtype and not ckpt.pickled:
                        writer.copy(entry.name, source)
                    else:
                        out = _dtype_of(entry.dtype)
                        writer.write_parts(entry.name, _folded_blocks(ckpt, source, updates or [], out, compute,
                                                                      device, entry.name, buffers))
                    weight_map[entry.name] = shard.name
                    written += entry.nbytes
                    bar.update(entry.nbytes)
            if ckpt.pickled:
                ckpt.release()
    if file is None and (len(layout) > 1 or (ckpt.index_file is not None and keep_index)):
        metadata = {k: v for k, v in ckpt.index_metadata.items() if k not in ("total_size", "total_parameters")}
        metadata["total_size"] = total
        if "total_parameters" in ckpt.index_metadata:
            metadata["total_parameters"] = sum(math.prod(e.shape) for s in layout for e in s.entries)
        index = {"metadata": metadata, "weight_map": weight_map}
        index_name = ckpt.index_file.name if ckpt.index_file is not None else f"{ckpt.shard_stem}.safetensors.index.json"
        (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return written


def _dtype_of(code: str) -> torch.dtype:
    from loramerge.io.checkpoint import code_dtype

    dtype = code_dtype(code)
    assert dtype is not None
    return dtype


def _folded_blocks(ckpt: Checkpoint, source: TensorInfo, updates: list[Update], out_dtype: torch.dtype,
                   compute: torch.dtype, device: torch.device, name: str, buffers: _Buffers
                   ) -> Iterator[torch.Tensor]:
    """The folded tensor as row blocks in ``out_dtype``: streamed, unless a DoRA update needs it whole."""
    active = [u for u in updates if u.weight != 0.0]
    if not active:
        if not source.shape:
            yield ckpt.read(source.name).to(out_dtype)
            return
        for start, stop in _blocks(source.shape):
            yield ckpt.read_rows(source.name, start, stop).to(out_dtype)
        return
    prepared = [_prepare(u, compute, device) for u in active]
    if any(u.kind == "dora" for u in active) or len(source.shape) < 2:
        W = ckpt.read(source.name).to(device=device, dtype=compute)
        result = _apply_whole(W, active, prepared)
        _check_finite(result, name)
        yield result.to(out_dtype)
        return
    with ckpt.mapped(source.name) as stored:
        for start, stop in _blocks(source.shape):
            shape = (stop - start, *source.shape[1:])
            block = buffers.work(shape, compute, device)
            block.copy_(stored[start:stop])
            for update, factors in zip(active, prepared):
                _apply_rows(block, update, factors, start, stop)
            result = buffers.out(shape, out_dtype)
            result.copy_(block)
            if out_dtype == torch.float16:  # the only cast of finite values that can overflow
                _check_finite(result, name)
            yield result


class _Buffers:
    """Block buffers reused across all tensors of a fold.

    Allocating a fresh block per tensor costs more than the maths (large allocations come from
    mmap, so every one page-faults on first touch). Output blocks rotate through three buffers
    per dtype because a background writer holds at most two.
    """

    def __init__(self) -> None:
        self._raw = torch.empty(0, dtype=torch.uint8)
        self._work: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._ring: dict[torch.dtype, list[torch.Tensor]] = {}
        self._turn: dict[torch.dtype, int] = {}

    def raw(self, nbytes: int) -> torch.Tensor:
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        return self._raw

    def work(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        held = self._work.get((dtype, device))
        if held is None or held.numel() < count:
            held = self._work[(dtype, device)] = torch.empty(count, dtype=dtype, device=device)
        return held[:count].view(shape)

    def out(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        ring = self._ring.setdefault(dtype, [torch.empty(0, dtype=dtype) for _ in range(3)])
        turn = self._turn.get(dtype, 0)
        self._turn[dtype] = turn + 1
        if ring[turn % 3].numel() < count:
            ring[turn % 3] = torch.empty(count, dtype=dtype)  # the old one lives on in a pending write
        return ring[turn % 3][:count].view(shape)


def _row_bytes(info: TensorInfo) -> int:
    return info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes


def _block_rows(shape: tuple[int, ...]) -> int:
    return max(1, min(shape[0], _BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))) if shape else 1


def _blocks(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """Row ranges of about :data:`_BLOCK_ELEMENTS` entries covering a tensor of ``shape``."""
    if not shape:
        yield 0, 1
        return
    step = _block_rows(shape)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)
    if shape[0] == 0:
        yield 0, 0


def _prepare(update: Update, compute: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Device-side factors: (s·w·B, A) for LoRA/DoRA as matrices; the tensor for bias/replace."""
    if update.lowrank is not None:
        B, A = update.lowrank.matrices(compute, device)
        factor = update.lowrank.scale * (1.0 if update.kind == "dora" else update.weight)
        return B * factor, A
    assert update.tensor is not None
    return (update.tensor.to(device=device, dtype=compute),)


def _lora_rows(update: Update, factors: tuple[torch.Tensor, ...], start: int, stop: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``start:stop`` of the update in the base tensor's layout."""
    B, A = factors
    if update.transposed:
        return (A[:, start:stop].T @ B.T).reshape(stop - start, *shape[1:])
    return (B[start:stop] @ A).reshape(stop - start, *shape[1:])


def _apply_rows(block: torch.Tensor, update: Update, factors: tuple[torch.Tensor, ...], start: int,
                stop: int) -> torch.Tensor:
    """Add ``update`` to ``block``, which holds rows ``start:stop`` of the tensor (in place)."""
    if update.rows is None:
        return _apply_range(block, update, factors, start, stop)
    source, first, size = update.rows
    low, high = max(start, first), min(stop, first + size)
    if low < high:
        _apply_range(block[low - start:high - start], update, factors, low - first + source, high - first + source)
    return block


def _apply_range(block: torch.Tensor, update: Update, factors: tuple[torch.Tensor, ...], start: int,
                 stop: int) -> torch.Tensor:
    """Add rows ``start:stop`` of ``update`` to ``block`` (in place)."""
    if update.kind == "lora":
        B, A = factors
        flat = block.view(block.shape[0], -1)  # a view: addmm_ adds B@A in place, without a temporary
        if update.transposed:
            flat.addmm_(A[:, start:stop].T, B.T)
        else:
            flat.addmm_(B[start:stop], A)
        return block
    (value,) = factors
    rows = value[start:stop] if value.ndim else value
    if update.kind == "bias":
        return block.add_(rows, alpha=update.weight)
    return block.copy_(rows) if update.weight == 1.0 else block.add_(rows - block, alpha=update.weight)


def _apply_whole(W: torch.Tensor, updates: list[Update], prepared: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    original = W.clone() if any(u.kind == "dora" for u in updates) else W
    current = W
    rows = W.shape[0] if W.ndim else 1
    for update, factors in zip(updates, prepared):
        if update.kind == "dora":
            assert update.lowrank is not None and update.lowrank.magnitude is not None
            source, start, size = update.rows or (0, 0, rows)
            # DoRA on a slice of a fused weight normalises that module's own rows, as in the unfused model.
            part, base = current[start:start + size], original[start:start + size]
            delta = _lora_rows(update, factors, source, source + size, tuple(part.shape))
            if dora_axis(update.lowrank) == "in":
                norm_dims = tuple(d for d in range(W.ndim) if d != 1)
                magnitude = update.lowrank.magnitude
            else:
                norm_dims = (0,) if update.transposed else tuple(range(1, W.ndim))
                magnitude = update.lowrank.magnitude
                if update.rows is not None:
                    magnitude = magnitude.reshape(-1)[source:source + size]
            norms = (base + delta).norm(p=2, dim=norm_dims, keepdim=True)
            magnitude = magnitude.to(device=W.device, dtype=W.dtype).reshape(norms.shape)
            target = (magnitude / norms) * (part + delta)
            moved = target if update.weight == 1.0 else part + update.weight * (target - part)
            if current is original:
                current = current.clone()
            current[start:start + size] = moved
        else:
            current = _apply_rows(current if current is not original else current.clone(), update, factors, 0, rows)
            if update.kind == "replace":
                original = current.clone()  # the DoRA norms use the weight PEFT loaded
    return current


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    # A finite sum proves every entry finite (NaN and Inf propagate); only an overflow needs the scan.
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteValues(f"tensor {name}: folding produced NaN/Inf values")


# ------------------------------------------------------------------------------- config and recipe


def _write_config(ckpt: Checkpoint, tmp: Path, out_dtype: torch.dtype | None, untie: bool) -> dict[str, Any]:
    source = ckpt.folder / "config.json"
    if not source.is_file():
        return {}
    config = json.loads(source.read_text())
    changes: dict[str, Any] = {}
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
        >>> import tempfile
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


def _base_info(folder: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """The base model's part of the recipe: where it came from and fingerprints of its small files."""
    info: dict[str, Any] = {
        "source": str(folder),
        "name_or_path": ckpt.config.get("_name_or_path"),
        "files": {p.name: file_sha256(p) for p in (folder / "config.json", ckpt.index_file) if p and p.is_file()},
        "shards": {p.name: p.stat().st_size for p in ckpt.shards},
    }
    previous = folder / RECIPE_NAME
    if previous.is_file():
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            info["recipe"] = json.loads(previous.read_text())
    elif ckpt.file is not None and RECIPE_KEY in ckpt.shard_metadata.get(ckpt.file, {}):
        with contextlib.suppress(ValueError):
            info["recipe"] = json.loads(ckpt.shard_metadata[ckpt.file][RECIPE_KEY])
    return info


def _recipe(job: _Job, base_info: dict[str, Any], adapters: Sequence[Adapter], changed: list[str], notes: list[str],
            config_changes: dict[str, Any]) -> dict[str, Any]:

    policy = job.policy
    policy_fields = {"rank": policy.rank, "energy": policy.energy, "max_error": policy.max_error,
                     "rank_max": policy.rank_max}
    recipe: dict[str, Any] = {
        "tool": "loramerge",
        "version": __version__,
        "command": "fold",
        "base": base_info,
        "adapters": [
            {"source": a.source, "base_model": a.base_model, "weight": w, "modules": len(a), "files": source_fingerprint(a)}
            for a, w in zip(adapters, job.weights)
        ],
        "method": job.method,
        "parameters": {**{k: v for k, v in policy_fields.items() if v is not None}, "seed": job.seed, **job.params},
        "dtype": dtype_name(job.out_dtype) if job.out_dtype is not None else "keep",
        "shard_size": job.shard_limit,
        "tied_embeddings": job.tied_mode,
        "config_changes": config_changes,
        "changed_tensors": changed,
        "notes": notes,
    }
    if job.merge_report is not None:
        recipe["merge"] = {"totals": job.merge_report.totals()}
    return recipe
