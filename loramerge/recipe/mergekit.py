"""mergekit configs, run as they are: each ``base+lora`` model becomes a source, the base a fold target.

A recipe file whose top level has mergekit's keys (``models``, ``merge_method``, ``base_model``,
``slices`` …) and no ``sources`` is a mergekit config. :func:`translate` turns it into the
equivalent loramerge recipe, a fold recipe with ``semantics: mergekit``:

* every ``models[i].model`` written ``base+lora`` (or ``{model: …, lora: …}``) becomes a source,
  its ``parameters`` (``weight``, ``density``) the source's; the base is the fold target, and
  every model must name the same one (``base_model`` too, when given);
* global ``parameters`` keep mergekit's names (``lambda``, ``normalize``, ``rescale``,
  ``int8_mask``, which only saves memory, is dropped);
* values may be constants, per-layer gradients or ``{filter, value}`` lists, as in mergekit;
  a filter, a plain substring of the tensor name there, becomes the equivalent regular
  expression on the module path here;
* ``dtype``/``out_dtype`` set the output dtype.

``semantics: mergekit`` makes the methods behave as mergekit's (see :data:`MERGEKIT_DEFAULTS`):
its default densities (1.0), TIES dividing by the agreeing weights, DARE's L1 rescale, the
``normalize`` of ``linear``. The merged update is kept exact (no re-ranking), as mergekit keeps
the whole tensor.

What is not a LoRA merge gets one exact line: whole models without LoRAs, ``slices`` and
``passthrough`` (layer stacking), tokenizer surgery (``tokenizer_source`` other than the base,
``tokenizer``, ``chat_template``), and methods with no LoRA-update equivalent here.

Example:
    >>> from loramerge.io.structured import compose_yaml
    >>> text = '''
    ... models:
    ...   - model: base+lora-a
    ...     parameters: {weight: 0.7, density: 0.5}
    ...   - model: base+lora-b
    ...     parameters: {weight: 0.3, density: 0.5}
    ... merge_method: ties
    ... base_model: base
    ... dtype: bfloat16
    ... '''
    >>> recipe = translate(compose_yaml(text, name="mk.yml"), "mk.yml", base_dir=Path("/nowhere"))
    >>> recipe["method"], recipe["base_model"], [s["weight"] for s in recipe["sources"]], recipe["output"]
    ('ties', 'base', [0.7, 0.3], {'dtype': 'bf16'})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from loramerge.errors import RecipeError
from loramerge.io.hub import parse_hub_id
from loramerge.io.structured import construct_yaml
from loramerge.recipe.model import SourceSpec, source_dict

# Top-level keys that only mergekit configs have.
MERGEKIT_KEYS = ("models", "merge_method", "slices", "modules", "tokenizer_source", "tokenizer", "chat_template",
                 "out_dtype", "dtype", "base_model", "parameters", "name")
_KNOWN = set(MERGEKIT_KEYS)

# mergekit's method → loramerge's method, and mergekit's own defaults in loramerge's parameters.
METHODS = {"linear": "task_arithmetic", "task_arithmetic": "task_arithmetic", "ties": "ties",
           "dare_ties": "dare_ties", "dare_linear": "dare_linear"}
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False},
    "ties": {"density": 1.0, "divide_by": "weights", "rescale": "none"},
    "dare_ties": {"density": 1.0, "divide_by": "none", "rescale": "l1"},
    "dare_linear": {"density": 1.0, "rescale": "l1"},
}
_CONSENSUS = ("ties", "dare_ties")
_SPARSIFIED = ("ties", "dare_ties", "dare_linear")
_NOT_LORA = {
    "passthrough": "passthrough copies or stacks whole layers (a frankenmerge), which is not a merge of LoRA updates",
    "slerp": "slerp interpolates whole weights between the base and one model, not LoRA updates",
    "model_stock": "model_stock interpolates towards whole weights by their angles, not LoRA updates",
    "nearswap": "nearswap compares whole weights with the base entry by entry, not LoRA updates",
    "arcee_fusion": "arcee_fusion scores whole-weight rows, not LoRA updates",
}
# Methods loramerge has under the same name but computes differently from mergekit.
_DIFFERENT = {
    "breadcrumbs": "mergekit's breadcrumbs ranks magnitudes over the whole tensor (and drops everything when "
                   "gamma·n < 1); loramerge's ranks per row, so the same file would not give the same model",
    "breadcrumbs_ties": "mergekit's breadcrumbs ranks magnitudes over the whole tensor; loramerge's ranks per row",
    "della": "mergekit's DELLA rescales the kept entries to the update's L1 norm, loramerge's by 1/p entry by entry, "
             "so the same file would not give the same model",
    "della_linear": "mergekit's DELLA rescales the kept entries to the update's L1 norm, loramerge's by 1/p",
}
# Top-level keys that ask for something other than a LoRA merge.
_NOT_LORA_KEYS = {
    "slices": "layer slices stack or cut whole layers (a frankenmerge), which is not a LoRA merge; use mergekit "
              "itself for it",
    "modules": "per-module merges of multimodal models are not a LoRA merge; use mergekit itself for them",
    "tokenizer": "building a new tokenizer (tokenizer surgery) is not a LoRA merge; the fold keeps the base model's "
                 "tokenizer",
    "chat_template": "changing the chat template is not a LoRA merge; the fold keeps the base model's tokenizer files",
}
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
_DROPPED = ("int8_mask",)  # a memory saving only: the result is the same


def is_mergekit_config(root: Node | None) -> bool:
    """True for a mapping with mergekit's keys (``models``/``merge_method``/``slices``) and no ``sources``.

    Example:
        >>> from loramerge.io.structured import compose_yaml
        >>> is_mergekit_config(compose_yaml("merge_method: ties\\nmodels: []", name="x")), \\
        ...     is_mergekit_config(compose_yaml("sources: [a]", name="x"))
        (True, False)
    """
    if not isinstance(root, MappingNode):
        return False
    keys = {k.value for k, _ in root.value if isinstance(k, ScalarNode)}
    return "sources" not in keys and bool(keys & {"models", "merge_method", "slices", "modules"})


def semantics_defaults(semantics: str, method: str) -> tuple[str, dict[str, Any]]:
    """The loramerge method and the parameter defaults that give ``method`` mergekit's behaviour.

    Example:
        >>> semantics_defaults("mergekit", "linear")
        ('task_arithmetic', {'normalize': True})
        >>> semantics_defaults("loramerge", "ties")
        ('ties', {})
    """
    if semantics != "mergekit":
        return method, {}
    return METHODS.get(method, method), dict(MERGEKIT_DEFAULTS.get(method, {}))


class _Reader:
    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, node: Node, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.name}:{node.start_mark.line + 1}: {key}: {message}")

    def mapping(self, node: Node, key: str) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.fail(node, key, "must be a mapping")
        out = {}
        for k, v in node.value:
            if not isinstance(k, ScalarNode):
                raise self.fail(k, key, "keys must be names")
            out[k.value] = (k, v)
        return out

    def text(self, node: Node, key: str) -> str:
        value = construct_yaml(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, key, "must be a non-empty string")
        return value.strip()


def translate(root: Node, name: str, *, base_dir: Path) -> dict[str, Any]:
    """The loramerge fold recipe (a plain mapping) equivalent to the mergekit config ``root``."""
    reader = _Reader(name)
    top = reader.mapping(root, "mergekit config")
    _refuse_non_lora(reader, top)
    method_node = top.get("merge_method")
    if method_node is None:
        raise RecipeError(f"{name}:1: merge_method: missing; a mergekit config names its merge_method")
    method = reader.text(method_node[1], "merge_method")
    if method in _NOT_LORA:
        raise reader.fail(method_node[1], "merge_method", f"{_NOT_LORA[method]}; use mergekit itself for it")
    if method in _DIFFERENT:
        raise reader.fail(method_node[1], "merge_method", f"{_DIFFERENT[method]}; write a loramerge recipe with "
                                                          f"method {method.removesuffix('_ties').removesuffix('_linear')} "
                                                          "to use loramerge's")
    if method not in METHODS:
        supported = ", ".join(METHODS)
        raise reader.fail(method_node[1], "merge_method", f"{method!r} has no LoRA-update equivalent in loramerge "
                                                          f"(a mergekit config can use {supported})")
    if "models" not in top:
        raise RecipeError(f"{name}:1: models: missing; list the base+lora models to merge")
    base = _base_model(reader, top)
    global_params = _parameters(reader, top["parameters"][1], "parameters") if "parameters" in top else {}
    sources, bases, plain_weights = [], {}, []
    models = top["models"][1]
    if not isinstance(models, SequenceNode) or not models.value:
        raise reader.fail(models, "models", "must be a non-empty list")
    for i, item in enumerate(models.value):
        key = f"models[{i}]"
        entry = reader.mapping(item, key)
        unknown = set(entry) - {"model", "parameters"}
        if unknown:
            raise reader.fail(entry[sorted(unknown)[0]][0], f"{key}.{sorted(unknown)[0]}", "unknown key; a model "
                                                                                          "entry has model and parameters")
        if "model" not in entry:
            raise reader.fail(item, key, "needs `model: base+lora`")
        model, lora = _model_ref(reader, entry["model"][1], f"{key}.model")
        params = _parameters(reader, entry["parameters"][1], f"{key}.parameters") if "parameters" in entry else {}
        if lora is None:
            if base is not None and model == base:
                plain_weights.append((entry["model"][1], params))
                continue
            raise reader.fail(entry["model"][1], f"{key}.model",
                              f"{model} is a whole model without a LoRA; loramerge merges LoRA adapters (write it "
                              "as base+lora), use mergekit itself to merge whole models")
        bases.setdefault(model, entry["model"][1])
        sources.append((lora, params, entry["model"][1], key))
    if not sources:
        raise reader.fail(models, "models", "has no base+lora model; there is no LoRA to merge")
    if base is None:
        base = next(iter(bases))
    others = [b for b in bases if b != base]
    if others:
        raise reader.fail(bases[others[0]], "models", f"the LoRAs are on different base models ({base}, "
                                                       f"{others[0]}); a LoRA merge needs one base, which it folds into")
    if method == "linear" and plain_weights:
        raise reader.fail(plain_weights[0][0], "models", "a linear merge with the bare base model among its "
                                                         "models weighs the base itself, which is not a LoRA merge")
    return _recipe(reader, method, base, sources, global_params, top, base_dir)


def _recipe(reader: _Reader, method: str, base: str, sources: list[tuple[str, dict, Node, str]],
            global_params: dict[str, tuple[Node, Any]], top: dict[str, tuple[Node, Node]],
            base_dir: Path) -> dict[str, Any]:
    per_source = ("weight", "density")
    shared = {"lambda": "lambda", "normalize": "normalize", "rescale": "rescale"}
    allowed = set(per_source) | set(shared) | set(_DROPPED)
    parameters: dict[str, Any] = {}
    for key, (node, value) in global_params.items():
        if key not in allowed or (key == "density" and method not in _SPARSIFIED):
            raise reader.fail(node, f"parameters.{key}", f"mergekit's {method} has no parameter {key!r} that "
                                                         "loramerge can honour")
        if key in per_source or key in _DROPPED:
            continue
        if not isinstance(value, (bool, int, float)):
            raise reader.fail(node, f"parameters.{key}", "must be a single value here")
        if key == "lambda":
            parameters["lambda"] = value
        elif key == "normalize":
            if method in _CONSENSUS:
                parameters["divide_by"] = "weights" if value else "none"
            elif method in ("linear", "task_arithmetic"):
                parameters["normalize"] = bool(value)
            elif value:
                raise reader.fail(node, "parameters.normalize", f"mergekit's {method} with normalize: true has no "
                                                                "loramerge equivalent")
        elif key == "rescale":
            parameters["rescale"] = "l1" if value else "none"
    out_sources = []
    for lora, params, node, key in sources:
        merged = {k: v for k, (_, v) in global_params.items() if k in per_source}
        for k, (pnode, value) in params.items():
            if k not in per_source:
                raise reader.fail(pnode, f"{key}.parameters.{k}", f"mergekit's {method} takes {k!r} once, under the "
                                                                  "top-level parameters")
            if k == "density" and method not in _SPARSIFIED:
                raise reader.fail(pnode, f"{key}.parameters.{k}", f"mergekit's {method} has no density")
            merged[k] = value
        if "weight" not in merged:
            raise reader.fail(node, key, "has no weight; mergekit requires parameters.weight for every model")
        source = _source_place(lora, base_dir)
        source["weight"] = merged.pop("weight")
        if merged:
            source["parameters"] = merged
        out_sources.append(source)
    recipe: dict[str, Any] = {
        "description": f"mergekit config {Path(reader.name).name}, run as a LoRA merge with mergekit's semantics",
        "semantics": "mergekit",
        "base_model": base,
        "sources": out_sources,
        "method": method,
    }
    if parameters:
        recipe["parameters"] = parameters
    dtype = top.get("out_dtype") or top.get("dtype")
    if dtype is not None:
        text = reader.text(dtype[1], "dtype")
        if text not in _DTYPES:
            raise reader.fail(dtype[1], "dtype", f"must be float32, float16 or bfloat16, got {text!r}")
        recipe["output"] = {"dtype": _DTYPES[text]}
    return recipe


def _refuse_non_lora(reader: _Reader, top: dict[str, tuple[Node, Node]]) -> None:
    for key, (knode, _) in top.items():
        if key not in _KNOWN:
            raise reader.fail(knode, key, "unknown key in a mergekit config (loramerge reads models, merge_method, "
                                          "base_model, parameters, dtype, out_dtype)")
    for key, message in _NOT_LORA_KEYS.items():
        if key in top:
            raise reader.fail(top[key][0], key, message)
    if "tokenizer_source" in top:
        value = construct_yaml(top["tokenizer_source"][1])
        if value not in (None, "base"):
            raise reader.fail(top["tokenizer_source"][1], "tokenizer_source",
                              f"{value!r} builds or swaps the vocabulary (tokenizer surgery), which is not a LoRA merge; "
                              "only `base` is supported: the fold keeps the base model's tokenizer")


def _base_model(reader: _Reader, top: dict[str, tuple[Node, Node]]) -> str | None:
    if "base_model" not in top:
        return None
    model, lora = _model_ref(reader, top["base_model"][1], "base_model")
    if lora is not None:
        raise reader.fail(top["base_model"][1], "base_model", "a base model with a LoRA folded in is not supported; "
                                                              "fold it first (loramerge fold) and name the result")
    return model


def _model_ref(reader: _Reader, node: Node, key: str) -> tuple[str, str | None]:
    """``(model, lora)`` of ``base+lora`` or ``{model: {path}, lora: {path}}``; revisions stay as ``@rev``."""
    if isinstance(node, ScalarNode):
        text = reader.text(node, key)
        parts = text.split("+")
        if len(parts) > 2 or any(not p.strip() for p in parts):
            raise reader.fail(node, key, f"{text!r} is not a model reference (model or model+lora)")
        return parts[0].strip(), parts[1].strip() if len(parts) == 2 else None
    entry = reader.mapping(node, key)
    if "model" not in entry:
        raise reader.fail(node, key, "needs `model` (and optionally `lora`)")
    return _path_ref(reader, entry["model"][1], f"{key}.model"), (
        _path_ref(reader, entry["lora"][1], f"{key}.lora") if "lora" in entry else None)


def _path_ref(reader: _Reader, node: Node, key: str) -> str:
    if isinstance(node, ScalarNode):
        return reader.text(node, key)
    entry = reader.mapping(node, key)
    if "path" not in entry:
        raise reader.fail(node, key, "needs `path`")
    path = reader.text(entry["path"][1], f"{key}.path")
    if "revision" in entry:
        return f"{path}@{reader.text(entry['revision'][1], f'{key}.revision')}"
    return path


def _parameters(reader: _Reader, node: Node, key: str) -> dict[str, tuple[Node, Any]]:
    """A ``parameters`` mapping: each value a constant, a gradient or a ``{filter, value}`` list (translated)."""
    out = {}
    for name, (knode, vnode) in reader.mapping(node, key).items():
        out[name] = (knode, _setting(reader, vnode, f"{key}.{name}"))
    return out


def _setting(reader: _Reader, node: Node, key: str) -> Any:
    value = construct_yaml(node)
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
        return value  # a gradient: the same interpolation over depth in both tools
    if isinstance(node, SequenceNode):
        rules = []
        for i, item in enumerate(node.value):
            entry = reader.mapping(item, f"{key}[{i}]")
            if "value" not in entry:
                raise reader.fail(item, f"{key}[{i}]", "a filter rule needs `value`")
            rule: dict[str, Any] = {"value": _setting(reader, entry["value"][1], f"{key}[{i}].value")}
            if "filter" in entry:
                text = reader.text(entry["filter"][1], f"{key}[{i}].filter")
                pattern = substring_filter(text) if text != "*" else ""
                if pattern:
                    rule["filter"] = pattern
            rules.append(rule)
        return rules
    raise reader.fail(node, key, "must be a number, a list of numbers (a gradient) or a list of {filter, value}")


def substring_filter(text: str) -> str:
    """A regular expression, searched in a module path, true exactly when mergekit's substring filter
    ``text`` is in that module's weight name (the path plus ``.weight``).

    Example:
        >>> pattern = substring_filter("q_proj.we")
        >>> bool(re.search(pattern, "model.layers.0.self_attn.q_proj")), bool(re.search(pattern, "x.q_projector"))
        (True, False)
        >>> bool(re.search(substring_filter("weight"), "any.module"))
        True
    """
    suffix = ".weight"
    if text in suffix:
        return ""  # inside ".weight" itself: every tensor name holds it
    options = [re.escape(text)]
    for cut in range(1, len(text)):
        head, tail = text[:cut], text[cut:]
        if suffix.startswith(tail):
            options.append(re.escape(head) + "$")
    return "|".join(options) if len(options) > 1 else options[0]


def _source_place(spelling: str, base_dir: Path) -> dict[str, Any]:
    """A source mapping: a local ``path`` when it exists (relative to ``base_dir``), else a Hub ``repo``."""
    ref = parse_hub_id(spelling)
    if ref is None or (base_dir / Path(spelling).expanduser()).exists():
        return {"path": spelling}
    return source_dict(SourceSpec(spelling, hub=ref))
