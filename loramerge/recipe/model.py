"""What a recipe is once read: the validated :class:`Recipe`, and how it is written back as YAML.

:mod:`loramerge.recipe.reader` builds a :class:`Recipe` from YAML, checking every key with its
file and line; this module holds the recipe itself and its serialisation: :meth:`Recipe.to_dict`,
:func:`saved_recipe` (the recipe as it ran, saved beside an output), :func:`source_location` and
:func:`dump_recipe`. The Hub publisher needs only this side.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loramerge.core.adapter import Adapter
from loramerge.io.hub import HubRef
from loramerge.merge.blocks import BlockWeights
from loramerge.merge.methods import MergeMethod, get_method
from loramerge.merge.overrides import POLICY_KEYS
from loramerge.merge.schedule import Schedule

RECIPE_FILENAME = "loramerge_recipe.yaml"


@dataclass
class SourceSpec:
    """One source of a recipe. Exactly one of ``local``/``hub``/``spelling`` decides how it loads.

    ``spelling`` alone (the shorthand form) loads like a command-line argument: a local path if
    one exists, else a Hub id.
    """

    spelling: str
    local: Path | None = None
    hub: HubRef | None = None
    weight: Schedule | None = None
    parameters: dict[str, Schedule] = field(default_factory=dict)
    format: str | None = None
    component: str | None = None
    block_weights: BlockWeights | None = None
    where: str = ""
    data: Path | None = None


@dataclass
class PushSpec:
    """Where ``output.push`` sends the result."""

    repo: str
    private: bool = False
    commit_message: str | None = None


@dataclass
class OutputSpec:
    """``output``: the path (optional when only pushing), format, dtype, push and model card; for a
    fold recipe the path is the model folder and ``shard_size`` re-shards it."""

    path: Path | None = None
    format: str | None = None
    dtype: str | None = None
    push: PushSpec | None = None
    card: bool = True
    shard_size: str | int | None = None


@dataclass
class Recipe:
    """A validated recipe. Build one with :func:`~loramerge.recipe.reader.load_recipe` or
    :func:`~loramerge.recipe.reader.parse_recipe`."""

    sources: list[SourceSpec]
    method: str = "linear"
    parameters: dict[str, Schedule] = field(default_factory=dict)
    policy: dict[str, Schedule] = field(default_factory=dict)
    block_weights: BlockWeights | None = None
    seed: int = 0
    compute_dtype: str = "fp32"
    ignore_base_mismatch: bool = False
    allow_pickle: bool = False
    output: OutputSpec = field(default_factory=OutputSpec)
    base_model: str | None = None
    tied_embeddings: str = "refuse"
    description: str | None = None
    file: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    locations: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    stats: Path | None = None
    semantics: str = "loramerge"
    translated_from: str | None = None  # "mergekit" when the file was a mergekit config

    @property
    def spec(self) -> MergeMethod:
        return get_method(self.method)

    def to_dict(self, *, sources: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The recipe as plain data, ready for YAML; ``sources`` replaces the source entries."""
        doc: dict[str, Any] = {}
        if self.description:
            doc["description"] = self.description
        if self.base_model:
            doc["base_model"] = self.base_model
        if self.model:
            doc["model"] = self.model
        if self.stats:
            doc["stats"] = str(self.stats)
        if self.semantics != "loramerge":
            doc["semantics"] = self.semantics
        doc["sources"] = list(sources) if sources is not None else [source_dict(s) for s in self.sources]
        doc["method"] = self.method
        if self.parameters:
            doc["parameters"] = {k: v.to_plain() for k, v in self.parameters.items()}
        for key in POLICY_KEYS:
            if key in self.policy:
                doc[key] = self.policy[key].to_plain()
        if self.block_weights is not None:
            doc["block_weights"] = self.block_weights.to_plain()
        doc["seed"] = self.seed
        if self.compute_dtype != "fp32":
            doc["compute_dtype"] = self.compute_dtype
        if self.ignore_base_mismatch:
            doc["ignore_base_mismatch"] = True
        if self.allow_pickle:
            doc["allow_pickle"] = True
        if self.tied_embeddings != "refuse":
            doc["tied_embeddings"] = self.tied_embeddings
        output = {k: v for k, v in (("format", self.output.format), ("dtype", self.output.dtype),
                                    ("shard_size", self.output.shard_size)) if v}
        if output:
            doc["output"] = output
        return doc


def source_dict(s: SourceSpec) -> dict[str, Any]:
    """A source as a recipe document writes it: ``repo`` (+ ``revision``, ``subfolder``) or ``path``, then its settings.

    Example:
        >>> source_dict(SourceSpec("org/x", hub=HubRef("org/x", "v1", None)))
        {'repo': 'org/x', 'revision': 'v1'}
    """
    entry: dict[str, Any]
    if s.hub is not None:
        entry = {"repo": s.hub.repo_id}
        if s.hub.revision:
            entry["revision"] = s.hub.revision
        if s.hub.subpath:
            entry["subfolder"] = s.hub.subpath
    elif s.local is not None:
        entry = {"path": str(s.local)}
    else:
        entry = {"path": s.spelling}
    if s.format:
        entry["format"] = s.format
    if s.component:
        entry["component"] = s.component
    if s.weight is not None:
        entry["weight"] = s.weight.to_plain()
    if s.parameters:
        entry["parameters"] = {k: v.to_plain() for k, v in s.parameters.items()}
    if s.block_weights is not None:
        entry["block_weights"] = s.block_weights.to_plain()
    if s.data is not None:
        entry["data"] = str(s.data)
    return entry


def saved_recipe(recipe: Recipe, adapters: Sequence[Adapter], out_dir: Path | None, *,
                 base_model: str | None = None) -> dict[str, Any]:
    """The recipe as it ran, to save beside the output: Hub sources pinned to their commit, local
    paths relative to the output folder, and no output path or push (give them again on a rerun).
    ``base_model`` is how a fold recipe's base is written (pinned or relative, see
    :func:`loramerge.hub.publish.model_location`)."""
    entries = []
    for spec, adapter in zip(recipe.sources, adapters):
        entry = source_dict(spec)
        entry.pop("path", None), entry.pop("repo", None), entry.pop("revision", None), entry.pop("subfolder", None)
        entry = {**source_location(adapter.origin, adapter.source, out_dir), **entry}
        if spec.data is not None:
            entry["data"] = source_location({"path": str(spec.data)}, None, out_dir)["path"]
        entries.append(entry)
    doc = recipe.to_dict(sources=entries)
    if recipe.model is not None and Path(recipe.model).exists():
        doc["model"] = source_location({"path": str(Path(recipe.model).resolve())}, None, out_dir)["path"]
    if recipe.stats is not None:
        doc["stats"] = source_location({"path": str(recipe.stats)}, None, out_dir)["path"]
    if base_model is not None:
        doc["base_model"] = base_model
    return doc


def source_location(origin: Mapping[str, Any], source: str | None, out_dir: Path | None) -> dict[str, Any]:
    """How a saved recipe names a loaded source (its ``origin`` and ``source``): ``repo`` + pinned
    ``revision`` (+ ``subfolder``) for the Hub, else ``path`` relative to ``out_dir`` (absolute when
    it is on another drive).

    Example:
        >>> source_location({"repo_id": "org/x", "revision": "main", "commit": "abc"}, "org/x", None)
        {'repo': 'org/x', 'revision': 'abc'}
        >>> source_location({"path": "/data/adapters/a"}, None, Path("/data/merged"))
        {'path': '../adapters/a'}
    """
    entry: dict[str, Any]
    if "repo_id" in origin:
        entry = {"repo": origin["repo_id"]}
        if origin.get("commit") or origin.get("revision"):
            entry["revision"] = origin.get("commit") or origin.get("revision")
        if origin.get("subpath"):
            entry["subfolder"] = origin["subpath"]
    else:
        path = origin.get("path") or source or "?"
        if out_dir is not None and os.path.isabs(path):
            with contextlib.suppress(ValueError):  # another drive on Windows: keep it absolute
                path = os.path.relpath(path, Path(out_dir).resolve())
        entry = {"path": path}
    if origin.get("component"):  # loaded for a named denoiser (Wan 2.2's second expert)
        entry["component"] = origin["component"]
    return entry


def dump_recipe(doc: Mapping[str, Any], header: str | None = None) -> str:
    """YAML text of a recipe document, numeric lists in flow style, with an optional comment header.

    Example:
        >>> print(dump_recipe({"sources": [{"path": "a", "weight": [0.2, 0.8]}], "method": "linear"}).strip())
        sources:
        - path: a
          weight: [0.2, 0.8]
        method: linear
    """
    class _Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
        flow = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow or None)

    _Dumper.add_representer(list, represent_list)
    text = yaml.dump(dict(doc), Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
                     width=1000)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text


