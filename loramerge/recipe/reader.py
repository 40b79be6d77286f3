"""YAML recipes: a merge written down, validated with line numbers, planned, run and saved.

A recipe names its sources (local paths or Hub repositories, each with a weight and optional
per-source parameters), the method and its parameters, the rank policy, the seed and the output::

    base_dir: ../demo-out            # relative paths below start here (default: this file's folder)
    sources:
      - path: adapters/math
        weight: 0.5
      - repo: org/code-lora          # a Hub repository; revision and subfolder are optional
        revision: v1
        weight: [0.2, 0.4]           # a per-layer gradient
      - adapters/style               # shorthand: spelled as on the command line
    method: svd
    parameters: {}                   # method parameters; any value may vary by module
    energy:                          # rank policy: rank, energy, max_error, rank_max
      - filter: self_attn            # per-module rules, first match wins
        value: 0.99
      - value: 0.9
    seed: 0
    output:
      path: merged/recipe
      format: peft                   # optional; dtype too
      push: org/merged-lora          # or {repo, private, commit_message}

Any setting that takes a number may be a constant, a per-layer gradient or a list of
``{filter, value}`` rules (see :mod:`loramerge.recipe.schedule`). ``base_model`` (a local model folder
or a Hub id) makes a fold recipe: ``output.path`` is then the model folder, ``output.dtype`` may
also be ``keep``, ``output.shard_size`` (``5GB``) re-shards it and ``tied_embeddings`` (``refuse``,
``untie``, ``shared``) is fold's choice for tied embeddings; see :mod:`loramerge.recipe.fold`.

``base_dir``, when relative, is resolved against the recipe file's folder (or the current
directory when it comes from ``--set``); sources' ``path`` and ``output.path`` against
``base_dir``. ``--set key=value`` edits the document before validation (``sources.0.weight=0.7``,
``output.path=/tmp/x``); its value is YAML. Every validation error gives the file, the line and
the key.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from loramerge.core.adapter import Adapter
from loramerge.errors import LoramergeError, RecipeError
from loramerge.io.hub import HubRef, parse_hub_id
from loramerge.io.structured import MAX_DEPTH, compose_yaml, read_text
from loramerge.merge.methods import MergeMethod, Param, get_method
from loramerge.merge.overrides import POLICY_KEYS
from loramerge.recipe.schedule import Rule, Schedule

RECIPE_FILENAME = "loramerge_recipe.yaml"

_TOP_KEYS = ("base_dir", "description", "sources", "method", "parameters", *POLICY_KEYS, "seed",
             "compute_dtype", "ignore_base_mismatch", "allow_pickle", "output", "base_model", "tied_embeddings")
_SOURCE_KEYS = ("path", "repo", "revision", "subfolder", "format", "weight", "parameters")
_OUTPUT_KEYS = ("path", "format", "dtype", "push", "card", "shard_size")
# Keys that only mean something when the recipe folds into a base model.
_FOLD_ONLY = ("output.shard_size", "tied_embeddings")
_PUSH_KEYS = ("repo", "private", "commit_message")


# --------------------------------------------------------------------------- the validated recipe


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
    where: str = ""


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
    """A validated recipe. Build one with :func:`load_recipe` or :func:`parse_recipe`."""

    sources: list[SourceSpec]
    method: str = "linear"
    parameters: dict[str, Schedule] = field(default_factory=dict)
    policy: dict[str, Schedule] = field(default_factory=dict)
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
        doc["sources"] = list(sources) if sources is not None else [_source_dict(s) for s in self.sources]
        doc["method"] = self.method
        if self.parameters:
            doc["parameters"] = {k: v.to_plain() for k, v in self.parameters.items()}
        for key in POLICY_KEYS:
            if key in self.policy:
                doc[key] = self.policy[key].to_plain()
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


def _source_dict(s: SourceSpec) -> dict[str, Any]:
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
    if s.weight is not None:
        entry["weight"] = s.weight.to_plain()
    if s.parameters:
        entry["parameters"] = {k: v.to_plain() for k, v in s.parameters.items()}
    return entry


# --------------------------------------------------------------------------- reading


def load_recipe(path: str | Path, sets: Sequence[str] = ()) -> Recipe:
    """Read, edit (``--set key=value``) and validate the recipe at ``path``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "r.yaml"
        >>> _ = p.write_text("sources: [a, b]\\nmethod: svd\\nrank: 4\\n")
        >>> r = load_recipe(p, ["seed=3"])
        >>> r.method, r.seed, r.policy["rank"].spec, [s.spelling for s in r.sources]
        ('svd', 3, 4, ['a', 'b'])
        >>> _ = p.write_text("sources: [a]\\nmethd: svd\\n")
        >>> load_recipe(p)
        Traceback (most recent call last):
        ...
        loramerge.errors.RecipeError: ...r.yaml:2: methd: unknown key (did you mean 'method'?); valid keys: ...
    """
    path = Path(path)
    text = read_text(path, error=RecipeError, missing=RecipeError, what="recipe file")
    return parse_recipe(text, name=str(path), sets=sets, base=path.resolve().parent)


def parse_recipe(text: str, *, name: str = "<recipe>", sets: Sequence[str] = (), base: Path | None = None) -> Recipe:
    """Validate recipe ``text``; ``name`` labels error messages and ``base`` anchors relative paths."""
    root = compose_yaml(text, name=name, error=RecipeError)
    for assignment in sets:
        root = _apply_set(root, assignment)
    reader = _Reader(name)
    if root is None:
        raise RecipeError(f"{name}:1: the recipe is empty; it needs at least `sources`")
    return reader.recipe(root, base if base is not None else Path.cwd())


def _apply_set(root: Node | None, assignment: str) -> Node:
    key, sep, value = assignment.partition("=")
    key = key.strip()
    label = f"--set {key}"
    if not sep or not key:
        raise RecipeError(f"--set {assignment}: expected key=value, e.g. --set sources.0.weight=0.7")
    if key.count(".") >= MAX_DEPTH:
        raise RecipeError(f"{label}: the key has more than {MAX_DEPTH} parts")
    value_node = compose_yaml(value, name=label, error=RecipeError) if value.strip() else None
    mark = Mark(label, 0, 0, 0, None, None)
    if value_node is None:
        value_node = ScalarNode("tag:yaml.org,2002:null", "", mark, mark)
    _remark(value_node, mark)
    if root is None:
        root = MappingNode("tag:yaml.org,2002:map", [], mark, mark)
    node: Node = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, MappingNode):
            found = next((kv for kv in node.value if isinstance(kv[0], ScalarNode) and kv[0].value == part), None)
            if last:
                if found is not None:
                    node.value[node.value.index(found)] = (found[0], value_node)
                else:
                    node.value.append((ScalarNode("tag:yaml.org,2002:str", part, mark, mark), value_node))
            elif found is not None:
                node = found[1]
            else:
                child = MappingNode("tag:yaml.org,2002:map", [], mark, mark)
                node.value.append((ScalarNode("tag:yaml.org,2002:str", part, mark, mark), child))
                node = child
        elif isinstance(node, SequenceNode):
            if not part.isdigit() or int(part) >= len(node.value):
                raise RecipeError(f"{label}: {'.'.join(parts[:i]) or 'the recipe'} is a list of {len(node.value)}; "
                                  f"{part!r} is not an index in it")
            if last:
                node.value[int(part)] = value_node
            else:
                node = node.value[int(part)]
        else:
            raise RecipeError(f"{label}: {'.'.join(parts[:i])} holds a single value, not a mapping or list")
    return root


def _remark(node: Node, mark: Mark) -> None:
    node.start_mark = node.end_mark = mark
    if isinstance(node, SequenceNode):
        for child in node.value:
            _remark(child, mark)
    elif isinstance(node, MappingNode):
        for k, v in node.value:
            _remark(k, mark)
            _remark(v, mark)


class _Reader:
    """Turns the YAML node tree into a :class:`Recipe`, failing with file, line and key."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loader = yaml.SafeLoader("")
        self.locations: dict[str, str] = {}

    # ---- primitives
    def where(self, node: Node) -> str:
        mark = node.start_mark
        if mark.name.startswith("--set"):
            return mark.name
        return f"{self.name}:{mark.line + 1}"

    def fail(self, node: Node, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.where(node)}: {key}: {message}" if key else f"{self.where(node)}: {message}")

    def value(self, node: Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: Node, key: str, allowed: Sequence[str]) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            what = key or "the recipe"
            raise self.fail(node, "", f"{what} must be a mapping with keys {', '.join(allowed)}, got {_kind(node)}")
        out: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            name = self.value(k) if isinstance(k, ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                raise self.fail(k, key or "recipe", f"keys must be names, got {_kind(k)}")
            if name in out:
                raise self.fail(k, full, f"duplicate key (first given at line {out[name][0].start_mark.line + 1})")
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(k, full, f"unknown key{hint}; valid keys: {', '.join(allowed)}")
            out[name] = (k, v)
            self.locations[full] = self.where(k)
        return out

    def scalar(self, node: Node, key: str, kind: str) -> Any:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, key, f"must be {_ARTICLE[kind]}, got {_kind(node)}")
        value = self.value(node)
        ok = {
            "string": isinstance(value, str),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
        }[kind]
        if not ok:
            hint = " (quote it)" if kind == "string" and value is not None else ""
            raise self.fail(node, key, f"must be {_ARTICLE[kind]}, got {value!r}{hint}")
        if kind == "number" and not math.isfinite(value):
            raise self.fail(node, key, f"must be finite, got {value!r}")
        return value

    def schedule(self, node: Node, key: str, coerce: Callable[[Any], Any], *, numeric: bool,
                 integer: bool = False) -> Schedule:
        """A constant, a gradient (list of numbers) or rules (list of ``{filter, value}``)."""
        if isinstance(node, ScalarNode):
            return Schedule(self.coerced(node, key, coerce), integer=integer)
        if isinstance(node, SequenceNode) and node.value:
            if all(isinstance(item, ScalarNode) for item in node.value):
                return Schedule(self.gradient(node, key, coerce, numeric), integer=integer)
            if all(isinstance(item, MappingNode) for item in node.value):
                rules = []
                for i, item in enumerate(node.value):
                    entry = self.mapping(item, f"{key}[{i}]", ("filter", "value"))
                    if "value" not in entry:
                        raise self.fail(item, f"{key}[{i}]", "a rule needs a `value`")
                    pattern = None
                    if "filter" in entry:
                        text = self.scalar(entry["filter"][1], f"{key}[{i}].filter", "string")
                        if text not in ("*", ""):
                            try:
                                pattern = re.compile(text)
                            except re.error as exc:
                                raise self.fail(entry["filter"][1], f"{key}[{i}].filter",
                                                f"not a valid regular expression ({exc})") from None
                    vnode = entry["value"][1]
                    rule_value = (self.gradient(vnode, f"{key}[{i}].value", coerce, numeric)
                                  if isinstance(vnode, SequenceNode) else self.coerced(vnode, f"{key}[{i}].value", coerce))
                    rules.append(Rule(pattern, rule_value))
                return Schedule(tuple(rules), integer=integer)
        raise self.fail(node, key, "must be a value, a list of numbers (a per-layer gradient) or a list of "
                                   "{filter, value} rules")

    def gradient(self, node: Node, key: str, coerce: Callable[[Any], Any], numeric: bool) -> list[Any]:
        if not numeric:
            raise self.fail(node, key, "takes a single value here, not a per-layer list")
        if not isinstance(node, SequenceNode) or not node.value:
            raise self.fail(node, key, "a per-layer gradient is a non-empty list of numbers")
        return [self.coerced(item, f"{key}[{i}]", coerce, require_number=True) for i, item in enumerate(node.value)]

    def coerced(self, node: Node, key: str, coerce: Callable[[Any], Any], require_number: bool = False) -> Any:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, key, f"must be a single value, got {_kind(node)}")
        raw = self.scalar(node, key, "number") if require_number else self.value(node)
        try:
            return coerce(raw)
        except LoramergeError as exc:
            raise self.fail(node, key, _strip_method(str(exc))) from None

    # ---- the document
    def recipe(self, root: Node, base: Path) -> Recipe:
        top = self.mapping(root, "", _TOP_KEYS)
        if "sources" not in top:
            raise RecipeError(f"{self.where(root)}: sources: missing; a recipe needs a list of sources")
        base_dir = base
        if "base_dir" in top:
            knode = top["base_dir"][1]
            text = self.scalar(knode, "base_dir", "string")
            anchor = Path.cwd() if self.where(knode).startswith("--set") else base
            base_dir = (anchor / Path(text).expanduser()).resolve()
        method_name = "linear"
        if "method" in top:
            mnode = top["method"][1]
            method_name = self.scalar(mnode, "method", "string")
            try:
                method_name = get_method(method_name).name
            except LoramergeError as exc:
                raise self.fail(mnode, "method", str(exc)) from None
        spec = get_method(method_name)
        params = self.parameters(top["parameters"][1], "parameters", spec) if "parameters" in top else {}
        try:  # the method's own cross-parameter check, on the values that are the same everywhere
            spec.resolve({k: v.spec for k, v in params.items() if v.is_constant})
        except LoramergeError as exc:
            raise self.fail(top["parameters"][0], "parameters", str(exc)) from None
        policy = {k: self.policy(top[k][1], k) for k in POLICY_KEYS if k in top}
        if not spec.accepts_rank and policy:
            key = next(iter(policy))
            raise self.fail(top[key][0], key, f"method {spec.name!r} keeps rank Σ rᵢ and takes no rank option")
        if sum(k in policy for k in ("rank", "energy", "max_error")) > 1 and all(
            policy[k].is_constant for k in policy if k != "rank_max"
        ):
            chosen = [k for k in ("rank", "energy", "max_error") if k in policy]
            raise self.fail(top[chosen[1]][0], chosen[1], f"choose one rank policy, not {' and '.join(chosen)}")
        snode = top["sources"][1]
        if not isinstance(snode, SequenceNode) or not snode.value:
            raise self.fail(snode, "sources", f"must be a non-empty list, got {_kind(snode)}")
        sources = [self.source(item, f"sources[{i}]", spec, base_dir) for i, item in enumerate(snode.value)]
        try:
            spec.check_source_count(len(sources))
        except LoramergeError as exc:
            raise self.fail(snode, "sources", str(exc)) from None
        self.check_per_source(spec, sources, snode)
        recipe = Recipe(
            sources=sources, method=spec.name, parameters=params, policy=policy,
            seed=self.scalar(top["seed"][1], "seed", "integer") if "seed" in top else 0,
            compute_dtype=self.choice(top, "compute_dtype", ("fp32", "fp64"), "fp32"),
            ignore_base_mismatch=self.flag(top, "ignore_base_mismatch"),
            allow_pickle=self.flag(top, "allow_pickle"),
            output=self.output(top["output"][1], base_dir) if "output" in top else OutputSpec(),
            base_model=self.base_model(top["base_model"][1], base_dir) if "base_model" in top else None,
            tied_embeddings=self.choice(top, "tied_embeddings", _tied_modes(), "refuse"),
            description=self.scalar(top["description"][1], "description", "string") if "description" in top else None,
            file=Path(self.name) if not self.name.startswith("<") else None,
            base_dir=base_dir,
            locations=self.locations,
        )
        self.check_fold(recipe)
        return recipe

    def check_fold(self, recipe: Recipe) -> None:
        """Fold-only keys need ``base_model``; a fold writes a model folder, not an adapter format."""
        if recipe.base_model is None:
            for key in _FOLD_ONLY:
                if key in self.locations:
                    raise RecipeError(f"{self.locations[key]}: {key}: only applies to a fold recipe (one with "
                                      "`base_model`)")
            if recipe.output.dtype == "keep":
                raise RecipeError(f"{self.locations['output.dtype']}: output.dtype: `keep` only applies to a fold "
                                  "recipe; leave it out to keep the sources' dtype")
        elif "output.format" in self.locations:
            raise RecipeError(f"{self.locations['output.format']}: output.format: a fold recipe writes a model "
                              "folder (its tensors as in the base model), not an adapter format")

    def base_model(self, node: Node, base_dir: Path) -> str:
        """A local base model (relative to ``base_dir``) when one exists there, else a Hub id as written."""
        text = self.scalar(node, "base_model", "string")
        local = base_dir / Path(text).expanduser()
        return str(local) if local.exists() else text

    def flag(self, top: dict[str, tuple[Node, Node]], key: str) -> bool:
        return bool(self.scalar(top[key][1], key, "boolean")) if key in top else False

    def choice(self, top: dict[str, tuple[Node, Node]], key: str, choices: Sequence[str], default: str) -> str:
        if key not in top:
            return default
        value = self.scalar(top[key][1], key, "string")
        if value not in choices:
            raise self.fail(top[key][1], key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def parameters(self, node: Node, key: str, spec: MergeMethod, *, allow_weight: bool = False) -> dict[str, Schedule]:
        valid = [p.key for p in spec.params] + (["weight"] if allow_weight else [])
        if not isinstance(node, MappingNode):
            raise self.fail(node, key, f"must be a mapping of parameter names to values, got {_kind(node)}")
        out = {}
        for name, (knode, vnode) in self.mapping_any(node, key).items():
            if name == "weight" and allow_weight:
                out[name] = self.schedule(vnode, f"{key}.weight", _weight, numeric=True)
                continue
            param = next((p for p in spec.params if name in (p.key, p.name)), None)
            if param is None:
                listed = ", ".join(valid) or "none"
                raise self.fail(knode, f"{key}.{name}", f"method {spec.name!r} has no parameter {name!r} "
                                                        f"(its parameters: {listed})")
            # Numeric parameters may vary by layer; the default tells, since a parameter that also
            # takes one value per source has a converter rather than float as its type.
            numeric = isinstance(param.default, (int, float)) and not isinstance(param.default, bool) \
                and not param.choices
            out[param.key] = self.schedule(vnode, f"{key}.{param.key}", _param_coercer(param, spec.name),
                                           numeric=numeric, integer=param.type is int)
        return out

    def mapping_any(self, node: MappingNode, key: str) -> dict[str, tuple[Node, Node]]:
        names = [self.value(k) for k, _ in node.value if isinstance(k, ScalarNode)]
        return self.mapping(node, key, [str(n) for n in names]) if names else {}

    def policy(self, node: Node, key: str) -> Schedule:
        integer = key in ("rank", "rank_max")
        return self.schedule(node, key, _POLICY_COERCE[key], numeric=True, integer=integer)

    def source(self, node: Node, key: str, spec: MergeMethod, base_dir: Path) -> SourceSpec:
        where = self.where(node)
        if isinstance(node, ScalarNode):
            text = self.scalar(node, key, "string")
            candidate = base_dir / Path(text).expanduser()
            local = candidate if candidate.exists() else None
            return SourceSpec(spelling=text, local=local, where=where)
        entry = self.mapping(node, key, _SOURCE_KEYS)
        has_path, has_repo = "path" in entry, "repo" in entry
        if has_path == has_repo:
            raise self.fail(node, key, "give exactly one of `path` (a local file or folder) or `repo` (a Hub id)")
        source = SourceSpec(spelling="", where=where)
        if has_path:
            for extra in ("revision", "subfolder"):
                if extra in entry:
                    raise self.fail(entry[extra][0], f"{key}.{extra}", "only applies to a `repo` source")
            text = self.scalar(entry["path"][1], f"{key}.path", "string")
            source.spelling, source.local = text, base_dir / Path(text).expanduser()
        else:
            rnode = entry["repo"][1]
            text = self.scalar(rnode, f"{key}.repo", "string")
            ref = parse_hub_id(text)
            if ref is None or ref.revision or ref.subpath:
                raise self.fail(rnode, f"{key}.repo", f"not a Hub repository id (org/name): {text!r}; "
                                                      "give `revision` and `subfolder` as their own keys")
            revision = self.scalar(entry["revision"][1], f"{key}.revision", "string") if "revision" in entry else None
            sub = self.scalar(entry["subfolder"][1], f"{key}.subfolder", "string") if "subfolder" in entry else None
            source.hub = HubRef(ref.repo_id, revision, sub.strip("/") if sub else None)
            source.spelling = str(source.hub)
        if "format" in entry:
            from loramerge.io.formats import get_format

            fmt = self.scalar(entry["format"][1], f"{key}.format", "string")
            try:
                source.format = get_format(fmt).name
            except LoramergeError as exc:
                raise self.fail(entry["format"][1], f"{key}.format", str(exc)) from None
        if "weight" in entry:
            source.weight = self.schedule(entry["weight"][1], f"{key}.weight", _weight, numeric=True)
        if "parameters" in entry:
            params = self.parameters(entry["parameters"][1], f"{key}.parameters", spec, allow_weight=True)
            if "weight" in params:
                if source.weight is not None:
                    raise self.fail(entry["parameters"][1], f"{key}.parameters.weight",
                                    "the weight is already given as the source's `weight`")
                source.weight = params.pop("weight")
            source.parameters = params
        return source

    def check_per_source(self, spec: MergeMethod, sources: list[SourceSpec], snode: SequenceNode) -> None:
        """A parameter given per source reaches the method as one value per source; refuse early if it can't."""
        for i, source in enumerate(sources):
            for name in source.parameters:
                param = next(p for p in spec.params if p.key == name)
                try:
                    param.coerce([param.default] * len(sources), spec.name)
                except LoramergeError:
                    node = snode.value[i]
                    loc = self.locations.get(f"sources[{i}].parameters.{name}", self.where(node))
                    raise RecipeError(
                        f"{loc}: sources[{i}].parameters.{name}: method {spec.name!r} takes one {name!r} for all "
                        "sources, not one per source; give it under the top-level `parameters`"
                    ) from None

    def output(self, node: Node, base_dir: Path) -> OutputSpec:
        entry = self.mapping(node, "output", _OUTPUT_KEYS)
        out = OutputSpec()
        if "path" in entry:
            out.path = base_dir / Path(self.scalar(entry["path"][1], "output.path", "string")).expanduser()
        if "format" in entry:
            from loramerge.io.formats import get_format

            fmt = self.scalar(entry["format"][1], "output.format", "string")
            try:
                out.format = get_format(fmt).name
            except LoramergeError as exc:
                raise self.fail(entry["format"][1], "output.format", str(exc)) from None
        if "dtype" in entry:
            from loramerge.core.devices import DTYPE_CHOICES

            dtype = self.scalar(entry["dtype"][1], "output.dtype", "string")
            if dtype not in (*DTYPE_CHOICES, "keep"):
                raise self.fail(entry["dtype"][1], "output.dtype", f"must be one of {', '.join(DTYPE_CHOICES)} "
                                                                   f"(or keep, for a fold), got {dtype!r}")
            out.dtype = dtype
        if "shard_size" in entry:
            from loramerge.io.checkpoint import parse_size

            snode = entry["shard_size"][1]
            size = self.value(snode) if isinstance(snode, ScalarNode) else None
            if isinstance(size, bool) or not isinstance(size, (str, int)):
                raise self.fail(snode, "output.shard_size", f"must be a size such as 5GB or 2GiB, got {_kind(snode)}")
            try:
                parse_size(size)
            except LoramergeError as exc:
                raise self.fail(snode, "output.shard_size", str(exc).replace("--shard-size ", "")) from None
            out.shard_size = size
        if "card" in entry:
            out.card = self.scalar(entry["card"][1], "output.card", "boolean")
        if "push" in entry:
            pnode = entry["push"][1]
            if isinstance(pnode, ScalarNode):
                out.push = PushSpec(self.repo_id(pnode, "output.push"))
            else:
                push = self.mapping(pnode, "output.push", _PUSH_KEYS)
                if "repo" not in push:
                    raise self.fail(pnode, "output.push", "needs `repo: org/name`")
                out.push = PushSpec(
                    self.repo_id(push["repo"][1], "output.push.repo"),
                    private=self.scalar(push["private"][1], "output.push.private", "boolean")
                    if "private" in push else False,
                    commit_message=self.scalar(push["commit_message"][1], "output.push.commit_message", "string")
                    if "commit_message" in push else None,
                )
        return out

    def repo_id(self, node: Node, key: str) -> str:
        text = self.scalar(node, key, "string")
        ref = parse_hub_id(text)
        if ref is None or ref.revision or ref.subpath:
            raise self.fail(node, key, f"not a Hub repository id (org/name): {text!r}")
        return ref.repo_id


def _tied_modes() -> tuple[str, ...]:
    from loramerge.fold.engine import TIED_MODES

    return TIED_MODES


_ARTICLE = {"string": "a string", "number": "a number", "integer": "an integer", "boolean": "true or false"}


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(node.value) if isinstance(node, ScalarNode) else type(node).__name__


def _strip_method(message: str) -> str:
    return re.sub(r"^method '[^']+': parameter '[^']+' ", "", message)


def _param_coercer(param: Param, method: str) -> Callable[[Any], Any]:
    return lambda value: param.coerce(value, method)


def _weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"a weight must be a finite number, got {value!r}")
    return float(value)


def _policy_coercer(key: str) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        from loramerge.core.rank import RankPolicy

        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"must be a number, got {value!r}")
        if key in ("rank", "rank_max"):
            if float(value) != int(value):
                raise RecipeError(f"must be an integer, got {value!r}")
            value = int(value)
        RankPolicy(**{key: value})  # range checks
        return value

    return coerce


_POLICY_COERCE = {key: _policy_coercer(key) for key in POLICY_KEYS}


# --------------------------------------------------------------------------- saving


def saved_recipe(recipe: Recipe, adapters: Sequence[Adapter], out_dir: Path | None, *,
                 base_model: str | None = None) -> dict[str, Any]:
    """The recipe as it ran, to save beside the output: Hub sources pinned to their commit, local
    paths relative to the output folder, and no output path or push (give them again on a rerun).
    ``base_model`` is how a fold recipe's base is written (pinned or relative, see
    :func:`loramerge.hub.publish.model_location`)."""
    entries = []
    for spec, adapter in zip(recipe.sources, adapters):
        entry = _source_dict(spec)
        entry.pop("path", None), entry.pop("repo", None), entry.pop("revision", None), entry.pop("subfolder", None)
        entry = {**source_location(adapter.origin, adapter.source, out_dir), **entry}
        entries.append(entry)
    doc = recipe.to_dict(sources=entries)
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
    if "repo_id" in origin:
        entry: dict[str, Any] = {"repo": origin["repo_id"]}
        if origin.get("commit") or origin.get("revision"):
            entry["revision"] = origin.get("commit") or origin.get("revision")
        if origin.get("subpath"):
            entry["subfolder"] = origin["subpath"]
        return entry
    path = origin.get("path") or source or "?"
    if out_dir is not None and os.path.isabs(path):
        with contextlib.suppress(ValueError):  # another drive on Windows: keep it absolute
            path = os.path.relpath(path, Path(out_dir).resolve())
    return {"path": path}


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
