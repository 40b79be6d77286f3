"""Reading YAML nodes with their file and line: mappings with known keys, typed scalars, schedules.

A :class:`NodeReader` turns one node at a time into a value, or fails with a
:class:`~loramerge.errors.RecipeError` that names the file, the line and the dotted key
(``recipe.yaml:7: sources[0].weight: must be a number``). It remembers where each key was given
(:attr:`NodeReader.locations`), so checks made later can still point at the line.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from loramerge.errors import LoramergeError, RecipeError
from loramerge.io.hub import parse_hub_id
from loramerge.merge.schedule import Rule, Schedule

Entry = dict[str, tuple[Node, Node]]  # key → (key node, value node)
Coerce = Callable[[Any], Any]

_ARTICLE = {"string": "a string", "number": "a number", "integer": "an integer", "boolean": "true or false"}


class NodeReader:
    """Reads the nodes of one YAML document (``name`` labels the errors), remembering where each key was.

    Example:
        >>> reader = NodeReader("r.yaml")
        >>> top = reader.mapping(yaml.compose("seed: 3\\nmethod: svd\\n"), "", ("seed", "method"))
        >>> reader.scalar(top["seed"][1], "seed", "integer"), reader.locations["method"]
        (3, 'r.yaml:2')
        >>> reader.scalar(top["method"][1], "method", "number")
        Traceback (most recent call last):
        ...
        loramerge.errors.RecipeError: r.yaml:2: method: must be a number, got 'svd'
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.loader = yaml.SafeLoader("")
        self.locations: dict[str, str] = {}

    def where(self, node: Node) -> str:
        """``file:line`` of ``node``, or the ``--set key`` that gave it."""
        mark = node.start_mark
        if mark.name.startswith("--set"):
            return mark.name
        return f"{self.name}:{mark.line + 1}"

    def fail(self, node: Node, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.where(node)}: {key}: {message}" if key else f"{self.where(node)}: {message}")

    def value(self, node: Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: Node, key: str, allowed: Sequence[str]) -> Entry:
        """The keys of a mapping node, each one of ``allowed`` and given once."""
        if not isinstance(node, MappingNode):
            what = key or "the recipe"
            raise self.fail(node, "", f"{what} must be a mapping with keys {', '.join(allowed)}, got {kind_of(node)}")
        out: Entry = {}
        for k, v in node.value:
            name = self.value(k) if isinstance(k, ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                raise self.fail(k, key or "recipe", f"keys must be names, got {kind_of(k)}")
            if name in out:
                raise self.fail(k, full, f"duplicate key (first given at line {out[name][0].start_mark.line + 1})")
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(k, full, f"unknown key{hint}; valid keys: {', '.join(allowed)}")
            out[name] = (k, v)
            self.locations[full] = self.where(k)
        return out

    def mapping_any(self, node: MappingNode, key: str) -> Entry:
        """The keys of a mapping node whose keys are free (still each given once)."""
        names = [self.value(k) for k, _ in node.value if isinstance(k, ScalarNode)]
        return self.mapping(node, key, [str(n) for n in names]) if names else {}

    def scalar(self, node: Node, key: str, kind: str) -> Any:
        """A single value of ``kind``: string, number (finite), integer or boolean."""
        if not isinstance(node, ScalarNode):
            raise self.fail(node, key, f"must be {_ARTICLE[kind]}, got {kind_of(node)}")
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

    def optional(self, entry: Entry, key: str, kind: str, label: str | None = None) -> Any:
        """``entry[key]`` read as :meth:`scalar` of ``kind``, or None when it is not given."""
        return self.scalar(entry[key][1], label or key, kind) if key in entry else None

    def flag(self, entry: Entry, key: str, label: str | None = None) -> bool:
        return bool(self.optional(entry, key, "boolean", label))

    def choice(self, entry: Entry, key: str, choices: Sequence[str], default: str) -> str:
        if key not in entry:
            return default
        value = self.scalar(entry[key][1], key, "string")
        if value not in choices:
            raise self.fail(entry[key][1], key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def repo_id(self, node: Node, key: str) -> str:
        """A plain Hub repository id, ``org/name``."""
        text = self.scalar(node, key, "string")
        ref = parse_hub_id(text)
        if ref is None or ref.revision or ref.subpath:
            raise self.fail(node, key, f"not a Hub repository id (org/name): {text!r}")
        return ref.repo_id

    def schedule(self, node: Node, key: str, coerce: Coerce, *, numeric: bool, integer: bool = False) -> Schedule:
        """A constant, a gradient (list of numbers) or rules (list of ``{filter, value}``)."""
        if isinstance(node, ScalarNode):
            return Schedule(self.coerced(node, key, coerce), integer=integer)
        if isinstance(node, SequenceNode) and node.value:
            if all(isinstance(item, ScalarNode) for item in node.value):
                return Schedule(self.gradient(node, key, coerce, numeric), integer=integer)
            if all(isinstance(item, MappingNode) for item in node.value):
                rules = [self.rule(item, f"{key}[{i}]", coerce, numeric) for i, item in enumerate(node.value)]
                return Schedule(tuple(rules), integer=integer)
        raise self.fail(node, key, "must be a value, a list of numbers (a per-layer gradient) or a list of "
                                   "{filter, value} rules")

    def rule(self, node: Node, key: str, coerce: Coerce, numeric: bool) -> Rule:
        """One ``{filter, value}`` rule of a schedule; no filter (or ``*``) matches every module."""
        entry = self.mapping(node, key, ("filter", "value"))
        if "value" not in entry:
            raise self.fail(node, key, "a rule needs a `value`")
        pattern = None
        if "filter" in entry:
            text = self.scalar(entry["filter"][1], f"{key}.filter", "string")
            if text not in ("*", ""):
                try:
                    pattern = re.compile(text)
                except re.error as exc:
                    raise self.fail(entry["filter"][1], f"{key}.filter",
                                    f"not a valid regular expression ({exc})") from None
        vnode = entry["value"][1]
        value = (self.gradient(vnode, f"{key}.value", coerce, numeric)
                 if isinstance(vnode, SequenceNode) else self.coerced(vnode, f"{key}.value", coerce))
        return Rule(pattern, value)

    def gradient(self, node: Node, key: str, coerce: Coerce, numeric: bool) -> list[Any]:
        if not numeric:
            raise self.fail(node, key, "takes a single value here, not a per-layer list")
        if not isinstance(node, SequenceNode) or not node.value:
            raise self.fail(node, key, "a per-layer gradient is a non-empty list of numbers")
        return [self.coerced(item, f"{key}[{i}]", coerce, require_number=True) for i, item in enumerate(node.value)]

    def coerced(self, node: Node, key: str, coerce: Coerce, require_number: bool = False) -> Any:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, key, f"must be a single value, got {kind_of(node)}")
        raw = self.scalar(node, key, "number") if require_number else self.value(node)
        try:
            return coerce(raw)
        except LoramergeError as exc:
            raise self.fail(node, key, _strip_method(str(exc))) from None


def kind_of(node: Node) -> str:
    """How an error names what it found: a mapping, a list, or the scalar's text.

    Example:
        >>> kind_of(yaml.compose("[1]")), kind_of(yaml.compose("x"))
        ('a list', "'x'")
    """
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(node.value) if isinstance(node, ScalarNode) else type(node).__name__


def _strip_method(message: str) -> str:
    return re.sub(r"^method '[^']+': parameter '[^']+' ", "", message)
