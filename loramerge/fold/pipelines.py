"""Folding into a diffusers pipeline folder: each touched component folded as its own model folder.

A pipeline folder has ``model_index.json`` and one folder per component (``unet``,
``text_encoder``, ``vae``, scheduler, tokenizer …). An adapter's modules are named with their
component (``unet.x``); each touched component is planned and written like a model folder;
components no adapter touches are copied as they are (converted when ``dtype`` asks for it);
scheduler, tokenizer and other files are copied; ``loramerge.json`` sits at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import IncompatibleAdapters, SourceNotFound
from loramerge.fold.job import FoldJob, FoldResult
from loramerge.fold.layout import OutShard, check_space, plan_layout
from loramerge.fold.plan import FoldPlan, plan_fold
from loramerge.fold.record import RECIPE_NAME, file_sha256, fold_record, write_record
from loramerge.fold.resolvers import component_resolver
from loramerge.fold.writer import copy_plain_files, write_config, write_model
from loramerge.io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, iter_folder_files, open_checkpoint
from loramerge.io.names import Resolver
from loramerge.io.output import atomic_output

PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder: one model folder per component


def pipeline_family(index: dict[str, Any]) -> list[str] | None:
    """The architectures a diffusers pipeline or model class stands for (None: one loramerge does not know).

    Example:
        >>> pipeline_family({"_class_name": "StableDiffusionXLPipeline"}), pipeline_family({"_class_name": "X"})
        (['sdxl'], None)
    """
    from loramerge.io.formats.families import family_of_class

    name = str(index.get("_class_name", ""))
    family = family_of_class(name)  # a diffusers family's pipeline or denoiser class (Wan, Qwen-Image …)
    if family is not None:
        return [family]
    if name.startswith("StableDiffusionXL"):
        return ["sdxl"]
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return ["sd1", "sd2"]
    if name.startswith("Flux") and not name.startswith("Flux2"):
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


@dataclass
class _Components:
    """The components a pipeline fold writes, with their checkpoints, plans and layouts; and those it copies."""

    opened: dict[str, Checkpoint] = field(default_factory=dict)
    plans: dict[str, FoldPlan] = field(default_factory=dict)
    layouts: dict[str, list[OutShard]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def release(self) -> None:
        for ckpt in self.opened.values():
            ckpt.release()


def fold_pipeline(folder: Path, index: dict[str, Any], units: Sequence[tuple[Adapter, float]],
                  loaded: Sequence[Adapter], job: FoldJob, resolver: Resolver | None, allow_pickle: bool,
                  notes: list[str]) -> FoldResult:
    """Fold into the diffusers pipeline folder ``folder`` (``index`` is its model_index.json) and write ``job.output``."""
    components = pipeline_components(folder, index)
    parts = _open_components(folder, components, _units_by_component(units, components, folder), job, resolver,
                             allow_pickle, notes)
    try:
        check_space(job.output, [shard for layout in parts.layouts.values() for shard in layout])
        changed = sorted(f"{c}.{name}" for c, plan in parts.plans.items() for name in plan.updates)
        plan_notes = [f"{c}: {note}" for c, plan in parts.plans.items() for note in plan.notes]
        written = 0
        config_changes: dict[str, Any] = {}
        extras = _pipeline_files(folder, parts.opened, plan_notes, job.follow_symlinks)
        with atomic_output(job.output, force=job.force) as tmp:
            for component, ckpt in parts.opened.items():
                (tmp / component).mkdir()
                plan = parts.plans[component]
                written += write_model(ckpt, plan, parts.layouts[component], tmp / component, job.compute,
                                       job.device, job.progress, job.shard_limit is None)
                change = write_config(ckpt, tmp / component, job.out_dtype, plan.untie, settings=plan.config)
                if change:
                    config_changes[component] = change
            copy_plain_files(folder, tmp, extras)
            record = fold_record(job, _pipeline_info(folder, index, parts), loaded, changed, plan_notes, config_changes)
            write_record(tmp, record)
    finally:
        parts.release()
    return job.result(changed, sum(p.module_count for p in parts.plans.values()),
                      sum(len(layout) for layout in parts.layouts.values()), written, notes + plan_notes, record)


def _units_by_component(units: Sequence[tuple[Adapter, float]], components: Sequence[str],
                        folder: Path) -> dict[str, list[tuple[Adapter, float]]]:
    per_component: dict[str, list[tuple[Adapter, float]]] = {}
    for adapter, weight in units:
        for component, part in split_by_component(adapter, components, folder).items():
            per_component.setdefault(component, []).append((part, weight))
    return per_component


def _open_components(folder: Path, components: Sequence[str], per_component: dict[str, list[tuple[Adapter, float]]],
                     job: FoldJob, resolver: Resolver | None, allow_pickle: bool, notes: list[str]) -> _Components:
    """Open and plan every component the fold writes: those it changes, and all when the dtype changes."""
    parts = _Components()
    for component in components:
        touched = component in per_component
        if not touched and job.out_dtype is None:
            parts.kept.append(component)
            continue
        try:
            ckpt = open_checkpoint(folder / component, allow_pickle=allow_pickle)
        except SourceNotFound:
            if touched:
                raise
            parts.kept.append(component)  # no weights this tool reads (variants only, say): copied untouched
            notes.append(f"{component}: weights kept as they are (not in a layout fold reads)")
            continue
        parts.opened[component] = ckpt
        parts.plans[component] = plan_fold(ckpt, per_component.get(component, []),
                                           resolver=resolver or component_resolver, tied_mode=job.tied_mode)
        parts.layouts[component] = plan_layout(ckpt, parts.plans[component], job.out_dtype, job.shard_limit)
    return parts


def _pipeline_files(folder: Path, opened: dict[str, Checkpoint], plan_notes: list[str],
                    follow_symlinks: bool) -> list[Path]:
    """Every file to copy: all but the folded components' weights, indexes and configs (written anew)."""
    def wanted(rel: Path) -> bool:
        if rel.as_posix() == RECIPE_NAME:
            return False
        component = rel.parts[0] if len(rel.parts) > 1 else ""
        if component in opened and (rel.parts[1:] == ("config.json",) or rel.name.endswith(WEIGHT_SUFFIXES)
                                    or rel.name.endswith(".index.json")):
            if rel.name not in opened[component].weight_files and rel.parts[1:] != ("config.json",):
                plan_notes.append(f"{rel}: left out (not the weights that were folded)")
            return False
        return True

    return list(iter_folder_files(folder, wanted, follow_symlinks=follow_symlinks))


def _pipeline_info(folder: Path, index: dict[str, Any], parts: _Components) -> dict[str, Any]:
    """The base pipeline's part of the record."""
    return {"source": str(folder), "name_or_path": index.get("_name_or_path"),
            "files": {PIPELINE_INDEX: file_sha256(folder / PIPELINE_INDEX)},
            "shards": {f"{c}/{p.name}": p.stat().st_size for c, ck in parts.opened.items() for p in ck.shards},
            "kept": parts.kept}
