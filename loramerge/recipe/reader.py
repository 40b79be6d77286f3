"""Reading YAML recipes: a merge written down, validated with file, line and key.

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
``{filter, value}`` rules (see :mod:`loramerge.merge.schedule`). ``base_model`` (a local model folder
or a Hub id) makes a fold recipe: ``output.path`` is then the model folder, ``output.dtype`` may
also be ``keep``, ``output.shard_size`` (``5GB``) re-shards it and ``tied_embeddings`` (``refuse``,
``untie``, ``shared``) is fold's choice for tied embeddings; see :mod:`loramerge.recipe.fold`.

``base_dir``, when relative, is resolved against the recipe file's folder (or the current
directory when it comes from ``--set``); sources' ``path`` and ``output.path`` against
``base_dir``. ``--set key=value`` edits the document before validation (``sources.0.weight=0.7``,
``output.path=/tmp/x``); its value is YAML (:mod:`loramerge.recipe.edits`). Every validation
error gives the file, the line and the key (:mod:`loramerge.recipe.nodes`). The result is a
:class:`~loramerge.recipe.model.Recipe`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from loramerge.core.rank import TARGET_FIELDS
from loramerge.errors import LoramergeError, RecipeError
from loramerge.io.hub import HubRef, parse_hub_id
from loramerge.io.structured import compose_yaml, read_text
from loramerge.merge.blocks import BlockWeights, block_rule
from loramerge.merge.methods import MergeMethod, Param, get_method
from loramerge.merge.overrides import POLICY_KEYS
from loramerge.merge.schedule import Schedule
from loramerge.recipe.edits import apply_set
from loramerge.recipe.mergekit import is_mergekit_config, semantics_defaults, translate
from loramerge.recipe.model import OutputSpec, PushSpec, Recipe, SourceSpec, dump_recipe
from loramerge.recipe.nodes import Entry, NodeReader, kind_of

_TOP_KEYS = ("base_dir", "description", "sources", "method", "parameters", *POLICY_KEYS, "sv_fro", "block_weights",
             "seed", "compute_dtype", "ignore_base_mismatch", "allow_pickle", "output", "base_model", "tied_embeddings",
             "model", "stats", "semantics")
SEMANTICS = ("loramerge", "mergekit")
_SOURCE_KEYS = ("path", "repo", "revision", "subfolder", "format", "component", "weight", "parameters", "data",
                "block_weights")
_OUTPUT_KEYS = ("path", "format", "dtype", "push", "card", "shard_size")
# Keys that only mean something when the recipe folds into a base model.
_FOLD_ONLY = ("output.shard_size", "tied_embeddings")
_PUSH_KEYS = ("repo", "private", "commit_message")


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
    """Validate recipe ``text``; ``name`` labels error messages and ``base`` anchors relative paths.

    Example:
        >>> parse_recipe("sources: [a, b]\\nenergy: 0.9\\n", sets=["method=ties"]).policy["energy"].spec
        0.9
    """
    root = compose_yaml(text, name=name, error=RecipeError)
    for assignment in sets:
        root = apply_set(root, assignment)
    if root is None:
        raise RecipeError(f"{name}:1: the recipe is empty; it needs at least `sources`")
    anchor = base if base is not None else Path.cwd()
    if is_mergekit_config(root):
        # Read as the loramerge recipe it stands for; messages about it name the original file.
        translated = compose_yaml(dump_recipe(translate(root, name, base_dir=anchor)), name=name, error=RecipeError)
        assert translated is not None
        recipe = _read_recipe(NodeReader(name), translated, anchor)
        recipe.translated_from = "mergekit"
        return recipe
    return _read_recipe(NodeReader(name), root, anchor)


def _read_recipe(reader: NodeReader, root: Node, base: Path) -> Recipe:
    """The whole document, section by section, in the order its errors are reported."""
    top = reader.mapping(root, "", _TOP_KEYS)
    if "sources" not in top:
        raise RecipeError(f"{reader.where(root)}: sources: missing; a recipe needs a list of sources")
    base_dir = _base_dir(reader, top, base)
    semantics = reader.choice(top, "semantics", SEMANTICS, "loramerge")
    spec, defaults = _method(reader, top, semantics)
    params = _method_parameters(reader, top, spec, defaults)
    policy = _rank_policy(reader, top, spec, semantics)
    block_weights = _block_weights(reader, top["block_weights"][1], "block_weights") if "block_weights" in top else None
    sources = _sources(reader, top["sources"][1], spec, base_dir)
    seed = reader.optional(top, "seed", "integer")
    recipe = Recipe(
        sources=sources, method=spec.name, parameters=params, policy=policy, block_weights=block_weights,
        seed=0 if seed is None else seed,
        compute_dtype=reader.choice(top, "compute_dtype", ("fp32", "fp64"), "fp32"),
        ignore_base_mismatch=reader.flag(top, "ignore_base_mismatch"),
        allow_pickle=reader.flag(top, "allow_pickle"),
        output=_output(reader, top["output"][1], base_dir) if "output" in top else OutputSpec(),
        base_model=_base_model(reader, top["base_model"][1], base_dir) if "base_model" in top else None,
        tied_embeddings=reader.choice(top, "tied_embeddings", _tied_modes(), "refuse"),
        description=reader.optional(top, "description", "string"),
        semantics=semantics,
        file=Path(reader.name) if not reader.name.startswith("<") else None,
        base_dir=base_dir,
        locations=reader.locations,
        model=_base_model(reader, top["model"][1], base_dir, "model") if "model" in top else None,
        stats=base_dir / Path(reader.scalar(top["stats"][1], "stats", "string")).expanduser() if "stats" in top else None,
    )
    _check_fold(recipe)
    _check_data(reader, recipe, top)
    return recipe


def _base_dir(reader: NodeReader, top: Entry, base: Path) -> Path:
    """Where relative paths start: ``base_dir`` (itself relative to ``base``, or for ``--set`` to the cwd)."""
    if "base_dir" not in top:
        return base
    knode = top["base_dir"][1]
    text = reader.scalar(knode, "base_dir", "string")
    anchor = Path.cwd() if reader.where(knode).startswith("--set") else base
    return (anchor / Path(text).expanduser()).resolve()


def _base_model(reader: NodeReader, node: Node, base_dir: Path, key: str = "base_model") -> str:
    """A local base model (relative to ``base_dir``) when one exists there, else a Hub id as written."""
    text = reader.scalar(node, key, "string")
    local = base_dir / Path(text).expanduser()
    return str(local) if local.exists() else text


# ------------------------------------------------------------------ method, parameters, rank policy


def _method(reader: NodeReader, top: Entry, semantics: str = "loramerge") -> tuple[MergeMethod, dict[str, Any]]:
    """The method, and the parameter defaults ``semantics: mergekit`` gives it (mergekit's own)."""
    name = reader.scalar(top["method"][1], "method", "string") if "method" in top else "linear"
    name, defaults = semantics_defaults(semantics, name)
    try:
        return get_method(name), defaults
    except LoramergeError as exc:
        raise reader.fail(top["method"][1], "method", str(exc)) from None


def _method_parameters(reader: NodeReader, top: Entry, spec: MergeMethod,
                       defaults: dict[str, Any] | None = None) -> dict[str, Schedule]:
    """The top-level ``parameters``, checked together by the method where they are the same everywhere."""
    params = _parameters(reader, top["parameters"][1], "parameters", spec) if "parameters" in top else {}
    params = {k: Schedule(v) for k, v in (defaults or {}).items() if k not in params} | params
    try:
        spec.resolve({k: v.spec for k, v in params.items() if v.is_constant})
    except LoramergeError as exc:
        raise reader.fail(top["parameters"][0], "parameters", str(exc)) from None
    return params


def _parameters(reader: NodeReader, node: Node, key: str, spec: MergeMethod, *,
                allow_weight: bool = False) -> dict[str, Schedule]:
    """A mapping of the method's parameters (by key or name) to schedules; a source's may hold its ``weight``."""
    if not isinstance(node, MappingNode):
        raise reader.fail(node, key, f"must be a mapping of parameter names to values, got {kind_of(node)}")
    valid = [p.key for p in spec.params] + (["weight"] if allow_weight else [])
    out = {}
    for name, (knode, vnode) in reader.mapping_any(node, key).items():
        if name == "weight" and allow_weight:
            out[name] = reader.schedule(vnode, f"{key}.weight", _weight, numeric=True)
            continue
        param = next((p for p in spec.params if name in (p.key, p.name)), None)
        if param is None:
            listed = ", ".join(valid) or "none"
            raise reader.fail(knode, f"{key}.{name}", f"method {spec.name!r} has no parameter {name!r} "
                                                      f"(its parameters: {listed})")
        # Numeric parameters may vary by layer; the default tells, since a parameter that also
        # takes one value per source has a converter rather than float as its type.
        numeric = isinstance(param.default, (int, float)) and not isinstance(param.default, bool) \
            and not param.choices
        out[param.key] = reader.schedule(vnode, f"{key}.{param.key}", _param_coercer(param, spec.name),
                                         numeric=numeric, integer=param.type is int)
    return out


def _rank_policy(reader: NodeReader, top: Entry, spec: MergeMethod, semantics: str = "loramerge") -> dict[str, Schedule]:
    """``rank``, ``energy``, ``max_error``, ``sv_ratio``, ``sv_cumulative`` and ``rank_max``: one
    policy, for a method that takes one. ``sv_fro`` F is read as ``energy`` F² (each value).

    Under ``semantics: mergekit`` a dense method keeps its whole result by default (its numerical
    rank), as mergekit keeps the whole tensor.
    """
    policy = {k: reader.schedule(top[k][1], k, _POLICY_COERCE[k], numeric=True, integer=k in ("rank", "rank_max"))
              for k in POLICY_KEYS if k in top}
    if "sv_fro" in top:
        if "energy" in top:
            raise reader.fail(top["sv_fro"][0], "sv_fro", "choose one rank policy, not energy and sv_fro "
                                                          "(sv_fro F is energy F²)")
        policy["energy"] = reader.schedule(top["sv_fro"][1], "sv_fro", _sv_fro, numeric=True)
    if semantics == "mergekit" and spec.dense and not policy:
        policy = {"max_error": Schedule(1e-6)}
    if not spec.accepts_rank and policy:
        key = next(k for k in (*POLICY_KEYS, "sv_fro") if k in top)
        raise reader.fail(top[key][0], key, f"method {spec.name!r} keeps rank Σ rᵢ and takes no rank option")
    if sum(k in policy for k in TARGET_FIELDS) > 1 and all(
        policy[k].is_constant for k in policy if k != "rank_max"
    ):
        chosen = [k for k in (*TARGET_FIELDS, "sv_fro") if k in top]
        raise reader.fail(top[chosen[1]][0], chosen[1], f"choose one rank policy, not {' and '.join(chosen)}")
    return policy


# ---------------------------------------------------------------------------------------- sources


def _sources(reader: NodeReader, snode: Node, spec: MergeMethod, base_dir: Path) -> list[SourceSpec]:
    if not isinstance(snode, SequenceNode) or not snode.value:
        raise reader.fail(snode, "sources", f"must be a non-empty list, got {kind_of(snode)}")
    sources = [_source(reader, item, f"sources[{i}]", spec, base_dir) for i, item in enumerate(snode.value)]
    try:
        spec.check_source_count(len(sources))
    except LoramergeError as exc:
        raise reader.fail(snode, "sources", str(exc)) from None
    _check_per_source(reader, spec, sources, snode)
    return sources


def _source(reader: NodeReader, node: Node, key: str, spec: MergeMethod, base_dir: Path) -> SourceSpec:
    """One source: a shorthand string, or a mapping with ``path`` or ``repo`` and its settings."""
    if isinstance(node, ScalarNode):
        text = reader.scalar(node, key, "string")
        candidate = base_dir / Path(text).expanduser()
        return SourceSpec(spelling=text, local=candidate if candidate.exists() else None, where=reader.where(node))
    entry = reader.mapping(node, key, _SOURCE_KEYS)
    source = _source_place(reader, node, entry, key, base_dir)
    if "format" in entry:
        source.format = _format_name(reader, entry["format"][1], f"{key}.format")
    if "component" in entry:
        source.component = _component_name(reader, entry["component"][1], f"{key}.component")
    if "data" in entry:
        source.data = base_dir / Path(reader.scalar(entry["data"][1], f"{key}.data", "string")).expanduser()
    if "weight" in entry:
        source.weight = reader.schedule(entry["weight"][1], f"{key}.weight", _weight, numeric=True)
    if "block_weights" in entry:
        source.block_weights = _block_weights(reader, entry["block_weights"][1], f"{key}.block_weights")
    if "parameters" in entry:
        params = _parameters(reader, entry["parameters"][1], f"{key}.parameters", spec, allow_weight=True)
        if "weight" in params:
            if source.weight is not None:
                raise reader.fail(entry["parameters"][1], f"{key}.parameters.weight",
                                  "the weight is already given as the source's `weight`")
            source.weight = params.pop("weight")
        source.parameters = params
    return source


def _source_place(reader: NodeReader, node: Node, entry: Entry, key: str, base_dir: Path) -> SourceSpec:
    """Where a source mapping points: a local ``path``, or a Hub ``repo`` with ``revision`` and ``subfolder``."""
    if ("path" in entry) == ("repo" in entry):
        raise reader.fail(node, key, "give exactly one of `path` (a local file or folder) or `repo` (a Hub id)")
    source = SourceSpec(spelling="", where=reader.where(node))
    if "path" in entry:
        for extra in ("revision", "subfolder"):
            if extra in entry:
                raise reader.fail(entry[extra][0], f"{key}.{extra}", "only applies to a `repo` source")
        text = reader.scalar(entry["path"][1], f"{key}.path", "string")
        source.spelling, source.local = text, base_dir / Path(text).expanduser()
        return source
    rnode = entry["repo"][1]
    text = reader.scalar(rnode, f"{key}.repo", "string")
    ref = parse_hub_id(text)
    if ref is None or ref.revision or ref.subpath:
        raise reader.fail(rnode, f"{key}.repo", f"not a Hub repository id (org/name): {text!r}; "
                                                "give `revision` and `subfolder` as their own keys")
    revision = reader.optional(entry, "revision", "string", f"{key}.revision")
    sub = reader.optional(entry, "subfolder", "string", f"{key}.subfolder")
    source.hub = HubRef(ref.repo_id, revision, sub.strip("/") if sub else None)
    source.spelling = str(source.hub)
    return source


def _check_per_source(reader: NodeReader, spec: MergeMethod, sources: list[SourceSpec], snode: SequenceNode) -> None:
    """A parameter given per source reaches the method as one value per source; refuse early if it can't."""
    for i, source in enumerate(sources):
        for name in source.parameters:
            param = next(p for p in spec.params if p.key == name)
            try:
                param.coerce([param.default] * len(sources), spec.name)
            except LoramergeError:
                loc = reader.locations.get(f"sources[{i}].parameters.{name}", reader.where(snode.value[i]))
                raise RecipeError(
                    f"{loc}: sources[{i}].parameters.{name}: method {spec.name!r} takes one {name!r} for all "
                    "sources, not one per source; give it under the top-level `parameters`"
                ) from None


def _block_weights(reader: NodeReader, node: Node, key: str) -> BlockWeights:
    """Block weights (:mod:`loramerge.merge.blocks`): a preset name, a block vector (a list of numbers), rules
    (``{filter, value}`` mappings, as for any per-module setting), or a list of a preset or vector spelling
    followed by rules."""
    items = node.value if isinstance(node, SequenceNode) else [node]
    if isinstance(node, SequenceNode) and node.value and all(
            isinstance(i, ScalarNode) and not isinstance(reader.value(i), str) for i in node.value):
        values = [reader.scalar(i, f"{key}[{n}]", "number") for n, i in enumerate(node.value)]
        return _checked(reader, node, key, lambda: BlockWeights(vector=tuple(float(v) for v in values)))
    if not items:
        raise reader.fail(node, key, "must be a preset name, a list of block weights or a list of rules")
    spellings: list[str] = []
    rules: list[tuple[str, float]] = []
    for n, item in enumerate(items):
        label = key if item is node else f"{key}[{n}]"
        if isinstance(item, MappingNode):
            rule = reader.rule(item, label, _weight, numeric=False)
            rules.append((rule.pattern.pattern if rule.pattern is not None else "*", float(rule.value)))
            continue
        text = reader.scalar(item, label, "string")
        if re.match(r"\s*\d+\s*:", text):
            raise reader.fail(item, label, f"{text!r}: give a source its own block weights under "
                                           "sources[i].block_weights")
        spellings.append(text)

    def build() -> BlockWeights:
        parsed = BlockWeights.parse(spellings)
        extra = [block_rule(text, value) for text, value in rules]
        return replace(parsed, rules=parsed.rules + tuple(extra), filters=parsed.filters + tuple(t for t, _ in rules))

    return _checked(reader, node, key, build)


def _checked(reader: NodeReader, node: Node, key: str, build: Callable[[], BlockWeights]) -> BlockWeights:
    try:
        return build()
    except LoramergeError as exc:
        raise reader.fail(node, key, str(exc).replace("--block-weights ", "")) from None


def _component_name(reader: NodeReader, node: Node, key: str) -> str:
    """A denoiser component (``transformer``, ``transformer_2``) a source file is for."""
    from loramerge.io.formats.component import DENOISERS

    text = reader.scalar(node, key, "string")
    if text not in DENOISERS:
        raise reader.fail(node, key, f"must be one of {', '.join(DENOISERS)}, got {text!r}")
    return text


def _format_name(reader: NodeReader, node: Node, key: str) -> str:
    """An adapter format's canonical name."""
    from loramerge.io.formats import get_format

    text = reader.scalar(node, key, "string")
    try:
        return get_format(text).name
    except LoramergeError as exc:
        raise reader.fail(node, key, str(exc)) from None


# ----------------------------------------------------------------------------------------- output


def _output(reader: NodeReader, node: Node, base_dir: Path) -> OutputSpec:
    entry = reader.mapping(node, "output", _OUTPUT_KEYS)
    out = OutputSpec()
    if "path" in entry:
        out.path = base_dir / Path(reader.scalar(entry["path"][1], "output.path", "string")).expanduser()
    if "format" in entry:
        out.format = _format_name(reader, entry["format"][1], "output.format")
    if "dtype" in entry:
        out.dtype = _output_dtype(reader, entry["dtype"][1])
    if "shard_size" in entry:
        out.shard_size = _shard_size(reader, entry["shard_size"][1])
    if "card" in entry:
        out.card = reader.scalar(entry["card"][1], "output.card", "boolean")
    if "push" in entry:
        out.push = _push(reader, entry["push"][1])
    return out


def _output_dtype(reader: NodeReader, node: Node) -> str:
    from loramerge.core.devices import DTYPE_CHOICES

    dtype = reader.scalar(node, "output.dtype", "string")
    if dtype not in (*DTYPE_CHOICES, "keep"):
        raise reader.fail(node, "output.dtype", f"must be one of {', '.join(DTYPE_CHOICES)} "
                                                f"(or keep, for a fold), got {dtype!r}")
    return dtype


def _shard_size(reader: NodeReader, node: Node) -> str | int:
    from loramerge.io.shards import parse_size

    size = reader.value(node) if isinstance(node, ScalarNode) else None
    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise reader.fail(node, "output.shard_size", f"must be a size such as 5GB or 2GiB, got {kind_of(node)}")
    try:
        parse_size(size)
    except LoramergeError as exc:
        raise reader.fail(node, "output.shard_size", str(exc).replace("--shard-size ", "")) from None
    return size


def _push(reader: NodeReader, node: Node) -> PushSpec:
    """``output.push``: a repository id, or ``{repo, private, commit_message}``."""
    if isinstance(node, ScalarNode):
        return PushSpec(reader.repo_id(node, "output.push"))
    push = reader.mapping(node, "output.push", _PUSH_KEYS)
    if "repo" not in push:
        raise reader.fail(node, "output.push", "needs `repo: org/name`")
    return PushSpec(
        reader.repo_id(push["repo"][1], "output.push.repo"),
        private=reader.flag(push, "private", "output.push.private"),
        commit_message=reader.optional(push, "commit_message", "string", "output.push.commit_message"),
    )


def _check_fold(recipe: Recipe) -> None:
    """Fold-only keys need ``base_model``; a fold writes a model folder, not an adapter format."""
    locations = recipe.locations
    if recipe.base_model is None:
        for key in _FOLD_ONLY:
            if key in locations:
                raise RecipeError(f"{locations[key]}: {key}: only applies to a fold recipe (one with `base_model`)")
        if recipe.output.dtype == "keep":
            raise RecipeError(f"{locations['output.dtype']}: output.dtype: `keep` only applies to a fold "
                              "recipe; leave it out to keep the sources' dtype")
    elif "output.format" in locations:
        raise RecipeError(f"{locations['output.format']}: output.format: a fold recipe writes a model "
                          "folder (its tensors as in the base model), not an adapter format")


# ------------------------------------------------------------------------------------- coercions


def _check_data(reader: NodeReader, recipe: Recipe, top: Entry) -> None:
    """A data-aware method needs a model and one data file per source; other methods take neither."""
    spec = recipe.spec
    snode = top["sources"][1]
    if not spec.needs_statistics:
        given = [k for k in ("model", "stats") if k in top]
        given += [f"sources[{i}].data" for i, s in enumerate(recipe.sources) if s.data is not None]
        if given:
            where = recipe.locations.get(given[0], reader.where(snode))
            raise RecipeError(f"{where}: {given[0]}: only applies to a data-aware method (regmean)")
        return
    method_node = top["method"][1]
    if recipe.base_model is not None:
        raise RecipeError(f"{reader.where(method_node)}: method: {spec.name!r} needs data, which a fold recipe cannot "
                          "collect yet; merge with a recipe without base_model, then fold the result")
    if recipe.model is None:
        raise RecipeError(f"{reader.where(method_node)}: model: method {spec.name!r} needs the base model "
                          "(`model: path-or-hub-id`) to collect its statistics")
    for i, source in enumerate(recipe.sources):
        if source.data is None:
            raise RecipeError(f"{reader.where(snode.value[i])}: sources[{i}].data: method {spec.name!r} needs one "
                              "data file per source (`data: task.jsonl`)")


def _tied_modes() -> tuple[str, ...]:
    from loramerge.fold.plan import TIED_MODES

    return TIED_MODES


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


def _sv_fro(value: Any) -> float:
    fraction = _POLICY_COERCE["energy"](value)  # in (0, 1], as F² must be
    return round(float(fraction) ** 2, 15)
