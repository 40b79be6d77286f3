"""The search space of a tuning run: what may vary, within which bounds, and how a point becomes a merge.

Dimensions (``--search``):

- ``lambda``: one global scale λ. A method with a ``lambda`` parameter (``task_arithmetic``,
  ``ties``, ``dare_*``, …) receives it as that parameter; for any other method (``linear``,
  ``cat``, ``regmean``, …) it multiplies every weight, which is the same update.
- ``weights``: one weight per source, negative allowed (LoraHub searches [-1.5, 1.5]).
- a parameter of the method, by its user-facing name (``density``, ``gamma``, ``epsilon``,
  ``off_diagonal``, ``majority_sign``, …), taken from the method's registered ``Param``: numbers
  get the bounds below (checked against the parameter's own range check), choices are categorical.
  A per-source parameter is searched as one value shared by every source.
- ``method``: the method itself, from the list given (``method=["ties", "dare_ties"]``).

The default is ``lambda`` and ``weights``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramerge.errors import InvalidParameter
from loramerge.merge.methods import MergeMethod, Param, get_method

DEFAULT_SEARCH: tuple[str, ...] = ("lambda", "weights")
STRUCTURAL = ("lambda", "weights", "method")

# Search bounds of the numeric method parameters. Each is inside the parameter's valid range and
# covers the values the papers report tuning over.
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "lambda": (0.0, 2.0),
    "weights": (-1.5, 1.5),
    "density": (0.05, 1.0),
    "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.3),
    "off_diagonal": (0.0, 1.0),
    "common_fraction": (0.0, 1.0),
    "t": (0.0, 1.0),
}

# Methods whose merged update is linear in the weights for fixed other parameters: a new weight
# vector is a rescale of cached per-source updates, not a new merge.
LINEAR_IN_WEIGHTS = frozenset({"linear", "cat", "task_arithmetic", "regmean"})


@dataclass(frozen=True)
class Dimension:
    """One searched quantity: numeric within ``[low, high]``, or one of ``choices``.

    ``methods`` lists the methods it applies to (empty: all).
    """

    name: str
    low: float = 0.0
    high: float = 1.0
    choices: tuple[str, ...] | None = None
    methods: tuple[str, ...] = ()

    @property
    def categorical(self) -> bool:
        return self.choices is not None


@dataclass(frozen=True)
class Candidate:
    """One merge to try: a method, one weight per source and the method's parameters (user-facing names).

    Example:
        >>> Candidate("ties", (0.5, 0.5), {"density": 0.3}).describe()
        'ties weights=0.5,0.5 density=0.3'
    """

    method: str
    weights: tuple[float, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        weights = ",".join(_short(w) for w in self.weights)
        params = " ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{self.method} weights={weights}" + (f" {params}" if params else "")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "weights": list(self.weights), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        return cls(str(data["method"]), tuple(float(w) for w in data["weights"]), dict(data.get("params") or {}))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a search over ``methods`` for ``sources`` sources.

    Example:
        >>> space = build_space(["linear"], 2)
        >>> [d.name for d in space.dimensions]
        ['lambda', 'weight.0', 'weight.1']
        >>> space.candidate({"lambda": 0.5, "weight.0": 1.0, "weight.1": -0.5})
        Candidate(method='linear', weights=(0.5, -0.25), params={})
    """

    methods: tuple[str, ...]
    sources: int
    dimensions: tuple[Dimension, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    @property
    def continuous(self) -> bool:
        return not any(d.categorical for d in self.dimensions)

    def start(self) -> dict[str, Any]:
        """The point tried first: every weight 1 and λ = 1/T (the mean of the sources), parameters at their defaults."""
        point: dict[str, Any] = {}
        for d in self.dimensions:
            if d.name == "lambda":
                point[d.name] = _clip(1.0 / self.sources, d)
            elif d.name.startswith("weight."):
                point[d.name] = _clip(1.0, d)
            elif d.name == "method":
                point[d.name] = self.methods[0]
            else:
                default = _param(get_method(d.methods[0] if d.methods else self.methods[0]), d.name).default
                point[d.name] = default if d.categorical else _clip(float(default), d)
        return point

    def candidate(self, point: Mapping[str, Any]) -> Candidate:
        """The merge a point of the space stands for (unsearched quantities at their defaults)."""
        method = str(point.get("method", self.methods[0]))
        spec = get_method(method)
        scale = float(point.get("lambda", 1.0))
        weights = [float(point.get(f"weight.{i}", 1.0)) for i in range(self.sources)]
        params: dict[str, Any] = {}
        for p in spec.params:
            if p.key in point:
                params[p.key] = point[p.key]
            elif p.key in self.fixed:
                params[p.key] = self.fixed[p.key]
        if "lambda" in point:
            if _param(spec, "lambda") is not None:
                params["lambda"] = scale
            else:
                weights = [w * scale for w in weights]
        return Candidate(spec.name, tuple(weights), params)


def _clip(value: float, d: Dimension) -> float:
    return min(max(value, d.low), d.high)


def _param(spec: MergeMethod, key: str) -> Param | None:
    return next((p for p in spec.params if p.key == key), None)


def parse_bounds(text: str | Sequence[str] | Mapping[str, Any] | None) -> dict[str, tuple[float, float]]:
    """``"lambda=0:1.5,density=0.1:0.9"`` (or a mapping name → (low, high)) as a dict.

    Example:
        >>> parse_bounds("lambda=0:1.5, weights=-1:1")
        {'lambda': (0.0, 1.5), 'weights': (-1.0, 1.0)}
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        parts = [text] if isinstance(text, str) else list(text)
        items = []
        for part in (p.strip() for chunk in parts for p in chunk.split(",")):
            if not part:
                continue
            name, sep, span = part.partition("=")
            low, colon, high = span.partition(":")
            if not sep or not colon:
                raise InvalidParameter(f"bounds {part!r}: write NAME=LOW:HIGH, e.g. lambda=0:1.5", parameter="bounds")
            items.append((name.strip(), (low, high)))
    out: dict[str, tuple[float, float]] = {}
    for name, value in items:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise InvalidParameter(f"bounds of {name!r} must be two numbers LOW:HIGH, got {value!r}",
                                   parameter="bounds") from None
        out[name] = (low, high)
    return out


def parse_search(search: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"lambda,weights,density"`` or a list as a tuple of dimension names (default: λ and the weights)."""
    if search is None:
        return DEFAULT_SEARCH
    parts = search.split(",") if isinstance(search, str) else [str(s) for s in search]
    return tuple(dict.fromkeys(p.strip().replace("-", "_") for p in parts if p.strip()))


def build_space(methods: str | Sequence[str], sources: int, search: str | Sequence[str] | None = None,
                bounds: str | Sequence[str] | Mapping[str, Any] | None = None,
                fixed: Mapping[str, Any] | None = None) -> SearchSpace:
    """The search space over ``methods`` (one name, a comma-separated list, or a list) for ``sources`` sources.

    ``search`` names the dimensions (see the module docstring); ``bounds`` overrides the
    default bounds (``NAME=LOW:HIGH``); ``fixed`` sets method parameters that are not searched.
    An empty space, an unknown dimension or method, or bounds that are empty, inverted or outside a
    parameter's valid range are errors.

    Example:
        >>> build_space("ties", 3, "density", bounds="density=0:0.5")
        Traceback (most recent call last):
        ...
        loramerge.errors.InvalidParameter: bounds of 'density' (0.0:0.5): method 'ties': parameter 'density' must be in (0, 1], got 0.0
    """
    names = tuple(dict.fromkeys(m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)
                                if m.strip()))
    if not names:
        raise InvalidParameter("no method to tune: give at least one", parameter="method")
    specs = [get_method(name) for name in names]
    if sources < 1:
        raise InvalidParameter("no sources to merge")
    for spec in specs:
        spec.check_source_count(sources)
    wanted = list(parse_search(search))
    if len(specs) > 1 and "method" not in wanted:
        wanted.append("method")
    if not wanted:
        raise InvalidParameter("the search space is empty: --search names no dimension (e.g. lambda,weights)",
                               parameter="search")
    limits = dict(PARAM_BOUNDS)
    overrides = parse_bounds(bounds)
    params_of = {p.key: [] for spec in specs for p in spec.params}
    for spec in specs:
        for p in spec.params:
            params_of[p.key].append((spec, p))
    known = set(STRUCTURAL) | set(params_of)
    for name in [*wanted, *overrides]:
        if name not in known:
            choices = ", ".join([*STRUCTURAL, *params_of]) or "lambda, weights"
            raise InvalidParameter(f"unknown search dimension {name!r} for method(s) {', '.join(n.name for n in specs)}; "
                                   f"choose from {choices}", parameter="search")
    dims: list[Dimension] = []
    for name in wanted:
        if name == "method":
            if len(specs) < 2:
                raise InvalidParameter("searching the method needs a list of methods (method=ties,dare_ties)",
                                       parameter="search")
            dims.append(Dimension("method", choices=tuple(s.name for s in specs)))
            continue
        owners = params_of.get(name, [])
        choice = next((p for _, p in owners if p.choices or p.type is bool), None)
        low, high = overrides.get(name, limits.get(name, (0.0, 1.0)))
        if choice is None or name in overrides:
            _check_bounds(name, low, high, owners)
        if name == "weights":
            dims.extend(Dimension(f"weight.{i}", low, high) for i in range(sources))
        elif name == "lambda":
            dims.append(Dimension("lambda", low, high))
        else:
            owners = params_of[name]
            methods = tuple(spec.name for spec, _ in owners) if len(owners) < len(specs) else ()
            param = owners[0][1]
            if param.choices:
                dims.append(Dimension(name, choices=tuple(param.choices), methods=methods))
            elif param.type is bool:
                dims.append(Dimension(name, choices=("true", "false"), methods=methods))
            else:
                if name not in limits and name not in overrides:
                    raise InvalidParameter(f"parameter {name!r} has no default search bounds; give them with "
                                           f"--bounds {name}=LOW:HIGH", parameter="bounds")
                dims.append(Dimension(name, low, high, methods=methods))
    return SearchSpace(tuple(s.name for s in specs), sources, tuple(dims), dict(fixed or {}))


def _check_bounds(name: str, low: float, high: float, owners: Sequence[tuple[MergeMethod, Param]]) -> None:
    where = f"bounds of {name!r} ({low}:{high})"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidParameter(f"{where}: both ends must be finite numbers", parameter="bounds")
    if not low < high:
        raise InvalidParameter(f"{where}: the low end must be below the high end", parameter="bounds")
    for spec, param in owners:
        if param.choices or param.type is bool:
            raise InvalidParameter(f"{where}: {name!r} is a choice ({', '.join(param.choices or ('true', 'false'))}), "
                                   "not a number; it takes no bounds", parameter="bounds")
        for end in (low, high):
            try:
                param.coerce(end, spec.name)
            except InvalidParameter as exc:
                raise InvalidParameter(f"{where}: {exc}", parameter="bounds") from None
