"""Values that vary by module: a constant, a per-layer gradient, or a list of filter rules.

The vocabulary is mergekit's (reference/mergekit.md §1.2, §3.5), with regular expressions:

* a constant ``0.5`` applies to every module;
* a gradient ``[0.2, 0.8]`` (numbers) is interpolated linearly over depth: anchors are spread
  evenly over t ∈ [0, 1], and a module in layer i of n has t = i / (n − 1);
* rules ``[{filter: self_attn, value: 0.7}, {value: 0.3}]``: the first rule whose ``filter``
  (a regex searched in the module path) matches wins; a rule without a filter, or with ``*``,
  matches everything. A rule's value may itself be a gradient. When no rule matches, the
  setting keeps its default.

The layer of a module is the first purely numeric component of its path
(``model.layers.3.self_attn.q_proj`` → 3). A module outside numbered layers sits at t = 0 when
it looks like an input embedding (``embed``, ``wte``, ``wpe``) and at t = 1 otherwise (final
norm, ``lm_head``), as mergekit places its pre- and post-layer weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")


class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()


@dataclass(frozen=True)
class Rule:
    """One ``{filter, value}`` entry; ``pattern`` None matches every module."""

    pattern: re.Pattern[str] | None
    value: Any

    def matches(self, module: str) -> bool:
        return self.pattern is None or self.pattern.search(module) is not None


@dataclass(frozen=True)
class Schedule:
    """A setting's value as a function of the module path and its depth ``t``.

    ``spec`` is a constant, a list of numbers (a gradient) or a tuple of :class:`Rule`.
    ``integer`` rounds interpolated values (ranks).

    Example:
        >>> Schedule([0.0, 1.0]).at("model.layers.1.q_proj", 0.25)
        0.25
        >>> rules = Schedule((Rule(re.compile("mlp"), 4), Rule(None, 8)))
        >>> rules.at("model.layers.0.mlp.up_proj", 0.0), rules.at("model.layers.0.self_attn.q_proj", 0.0)
        (4, 8)
    """

    spec: Any
    integer: bool = False

    @property
    def is_constant(self) -> bool:
        """True when every module gets the same value."""
        return not isinstance(self.spec, (list, tuple))

    def at(self, module: str, t: float) -> Any:
        """The value for ``module`` at depth ``t``, or :data:`NO_VALUE` when no rule matches."""
        value = self.spec
        if isinstance(value, tuple):
            value = next((rule.value for rule in value if rule.matches(module)), NO_VALUE)
        if isinstance(value, list):
            value = interpolate(value, t)
            return round(value) if self.integer else value
        return value

    def to_plain(self) -> Any:
        """The YAML form: a constant, a list of numbers, or a list of ``{filter, value}`` mappings."""
        if isinstance(self.spec, tuple):
            return [
                ({"filter": rule.pattern.pattern} if rule.pattern is not None else {}) | {"value": rule.value}
                for rule in self.spec
            ]
        return list(self.spec) if isinstance(self.spec, list) else self.spec


def interpolate(values: Sequence[float], t: float) -> float:
    """Linear interpolation of evenly spaced anchors ``values`` at ``t`` ∈ [0, 1].

    Example:
        >>> interpolate([0.0, 1.0, 0.0], 0.25), interpolate([2.0], 0.7)
        (0.5, 2.0)
    """
    if len(values) == 1:
        return float(values[0])
    position = min(max(t, 0.0), 1.0) * (len(values) - 1)
    low = min(math.floor(position), len(values) - 2)
    frac = position - low
    return float(values[low]) * (1.0 - frac) + float(values[low + 1]) * frac


def layer_index(module: str) -> int | None:
    """The layer number of a module path: its first purely numeric component.

    Example:
        >>> layer_index("model.layers.12.mlp.up_proj"), layer_index("lm_head")
        (12, None)
    """
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def depths(modules: Iterable[str]) -> dict[str, float]:
    """Each module's depth t ∈ [0, 1] among ``modules`` (see the module docstring).

    Example:
        >>> depths(["model.embed_tokens", "model.layers.0.q", "model.layers.2.q", "lm_head"])
        {'model.embed_tokens': 0.0, 'model.layers.0.q': 0.0, 'model.layers.2.q': 1.0, 'lm_head': 1.0}
    """
    modules = list(modules)
    layers = [i for i in (layer_index(m) for m in modules) if i is not None]
    last = max(layers, default=0)
    out = {}
    for m in modules:
        i = layer_index(m)
        if i is None:
            out[m] = 0.0 if _EMBEDDING.search(m) else 1.0
        else:
            out[m] = i / last if last > 0 else 0.0
    return out
