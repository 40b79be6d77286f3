"""The merge-method interface: parameters, per-module inputs and the method description.

A method is a plain function called once per module::

    def my_method(inputs: ModuleInputs, *, density: float) -> LowRank | torch.Tensor | MethodOutput

It returns either a :class:`~loramerge.core.adapter.LowRank` (exact, factored) or a dense update as
an ``(out, in·k)`` matrix; the merge engine applies the rank policy to either. A
:class:`MergeMethod` wraps the function with its parameters, formula and paper, and one line in
``loramerge/methods/__init__.py`` registers it.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loramerge.core.adapter import LowRank
from loramerge.errors import InvalidParameter


@dataclass(frozen=True)
class Param:
    """One method parameter: its API name, default, type, help text and optional range check.

    ``check`` returns an error message for a bad value, or ``None``. The CLI option is
    ``--name`` with underscores as hyphens and a trailing underscore dropped (``lambda_`` →
    ``--lambda``); recipes use the same spelling without the trailing underscore.

    A ``per_source`` parameter takes one value for every source or one value per source (like
    mergekit's per-model ``tensor_parameters``): a number, a sequence, or a comma-separated
    string as on the command line. Each value is checked on its own.

    Example:
        >>> Param("lambda_", 1.0, float, "scale").option
        '--lambda'
        >>> Param("density", 0.5, float, "kept fraction", per_source=True).coerce("0.5, 0.3", "ties")
        (0.5, 0.3)
    """

    name: str
    default: Any
    type: type
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    per_source: bool = False

    @property
    def key(self) -> str:
        """The user-facing spelling (CLI and recipes): ``lambda`` for ``lambda_``."""
        return self.name.rstrip("_")

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")

    def coerce(self, value: Any, method: str) -> Any:
        """``value`` converted to this parameter's type and checked, or :class:`InvalidParameter`.

        A per-source parameter given several values comes back as a tuple, one value as a scalar.
        """
        if self.per_source:
            parts = _split_values(value)
            if not parts:
                raise InvalidParameter(f"method {method!r}: parameter {self.key!r} needs a value, got {value!r}",
                                       parameter=self.key)
            converted = tuple(self._coerce_one(part, method) for part in parts)
            return converted[0] if len(converted) == 1 and not isinstance(value, (list, tuple)) else converted
        return self._coerce_one(value, method)

    def _coerce_one(self, value: Any, method: str) -> Any:
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                converted: Any = value.lower() in ("true", "1", "yes")
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                converted = self.type(value)
        except (TypeError, ValueError):
            raise InvalidParameter(
                f"method {method!r}: parameter {self.key!r} must be {self.type.__name__}, got {value!r}",
                parameter=self.key,
            ) from None
        if self.choices is not None and converted not in self.choices:
            raise InvalidParameter(
                f"method {method!r}: parameter {self.key!r} must be one of {', '.join(self.choices)}, got {value!r}",
                parameter=self.key,
            )
        if self.check is not None:
            problem = self.check(converted)
            if problem:
                raise InvalidParameter(f"method {method!r}: parameter {self.key!r} {problem}, got {converted!r}",
                                       parameter=self.key)
        return converted


def _split_values(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def per_source(value: Any, count: int) -> tuple[Any, ...]:
    """A per-source parameter's value as one entry per source (a scalar is repeated).

    Example:
        >>> per_source(0.5, 3), per_source((0.2, 0.4), 2)
        ((0.5, 0.5, 0.5), (0.2, 0.4))
    """
    if isinstance(value, tuple):
        return value
    return (value,) * count


def module_seed(seed: int, module: str) -> int:
    """A 63-bit seed from the merge seed and the module path, independent of order and device.

    Example:
        >>> module_seed(0, "model.layers.0.q_proj") == module_seed(0, "model.layers.0.q_proj")
        True
    """
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class ModuleInputs:
    """Everything a method sees for one module.

    ``terms`` has one entry per source, ``None`` where that source lacks the module (it then
    contributes zero). The factors are already on the compute device and in the compute dtype.
    ``statistics`` (data-aware methods only) holds each source's input Gram of the module, on the
    compute device, None where it was not collected.
    """

    module: str
    terms: Sequence[LowRank | None]
    weights: Sequence[float]
    seed: int = 0
    statistics: Sequence[torch.Tensor | None] | None = None

    @property
    def present(self) -> list[tuple[LowRank, float]]:
        """The (update, weight) pairs of the sources that have this module."""
        return [(t, w) for t, w in zip(self.terms, self.weights) if t is not None]

    @property
    def template(self) -> LowRank:
        """The first present update: the module's kind, layout and shapes."""
        for t in self.terms:
            if t is not None:
                return t
        raise ValueError(f"module {self.module} has no source")

    def deltas(self) -> list[torch.Tensor]:
        """Each source's dense update ``s·B@A`` as an ``(out, in·k)`` matrix; zeros where absent."""
        template = self.template
        B0, _ = template.matrices(template.dtype)
        zeros = torch.zeros(template.matrix_shape, dtype=template.dtype, device=B0.device)
        out = []
        for t in self.terms:
            if t is None:
                out.append(zeros)
            else:
                B, A = t.matrices(t.dtype)
                out.append(t.scale * (B @ A))
        return out

    def weighted_factors(self, dtype: torch.dtype | None = None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(source index, B, A)`` with ``B @ A = wᵢ·sᵢ·Bᵢ Aᵢ`` for each present source of non-zero weight.

        The factor c = w·s is split as √|c| on each side (sign on B), so neither factor is tiny.
        """
        out = []
        for index, (term, weight) in enumerate(zip(self.terms, self.weights)):
            c = weight * term.scale if term is not None else 0.0
            if term is None or c == 0.0:
                continue
            B, A = term.matrices(dtype or term.dtype)
            root = math.sqrt(abs(c))
            out.append((index, B * math.copysign(root, c), A * root))
        return out

    def weighted_deltas(self) -> list[tuple[int, torch.Tensor]]:
        """``(source index, wᵢ·sᵢ·Bᵢ Aᵢ)`` as dense ``(out, in·k)`` matrices, for present sources of non-zero weight."""
        return [(index, B @ A) for index, B, A in self.weighted_factors()]

    def generator(self, source: int | None = None) -> torch.Generator:
        """A CPU generator seeded from the merge seed, this module's path and optionally a source index.

        Random draws are made on the CPU and then moved, so that the same seed gives the same masks
        whatever the compute device, and each source's mask does not depend on the other sources.
        """
        seed = self.seed if source is None else module_seed(self.seed, f"source {source}")
        return torch.Generator(device="cpu").manual_seed(seed)


@dataclass(frozen=True)
class MethodOutput:
    """A method's result with method-specific statistics for the report (e.g. sign conflicts)."""

    delta: LowRank | torch.Tensor
    stats: Mapping[str, float] = field(default_factory=dict)


Rerank = Literal["exact", "max_source_rank"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``default_rank`` says what happens when the user gives no rank policy: ``"exact"`` keeps the
    result as it is (factored results only), ``"max_source_rank"`` re-ranks to the largest source
    rank (as PEFT's svd does). ``accepts_rank=False`` refuses any rank option (``cat``).
    ``dense=True`` marks methods that build dense per-module updates; the engine runs their
    modules one at a time to bound memory. ``needs_statistics=True`` marks data-aware methods,
    which receive each source's input Grams (:class:`~loramerge.merge.statistics.InputStatistics`).

    ``uses_accelerator`` says whether the method's work runs on the compute device (``--device``)
    or stays on the CPU. Methods that build dense ``m×n`` updates set it: their element-wise work
    and the dense SVD after it are what an accelerator is for. The factor-space methods leave it
    off: their work is Gram matrices of ``(m + n)×R`` factors and decompositions of ``R×R`` cores,
    a few milliseconds per Llama-7B module on one CPU core (``benchmarks/device.py`` measures it),
    where each small decomposition on a GPU costs a kernel launch and a synchronisation, and the
    CPU runs several modules at once (mergekit's ``uses_accelerator`` draws the same line).

    The function's keyword arguments must be exactly the parameters' names; a mismatch is a
    ``TypeError`` when the method is defined, not a surprise in the middle of a merge.
    """

    name: str
    function: Callable[..., LowRank | torch.Tensor | MethodOutput]
    summary: str
    formula: str
    paper: str
    params: tuple[Param, ...] = ()
    default_rank: Rerank = "exact"
    accepts_rank: bool = True
    min_sources: int = 1
    max_sources: int | None = None
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    dense: bool = False
    needs_statistics: bool = False
    uses_accelerator: bool = False

    def __post_init__(self) -> None:
        check_signature(self.name, self.function, self.params)

    def resolve(self, given: Mapping[str, Any], sources: int | None = None) -> dict[str, Any]:
        """The full parameter set: ``given`` checked and converted, defaults filled in.

        With ``sources`` (the number of sources), every per-source parameter becomes a tuple of
        that length, and a list of the wrong length is refused.

        Example:
            >>> from loramerge.merge.methods import get_method
            >>> get_method("linear").resolve({})
            {}
            >>> get_method("ties").resolve({"density": [0.2, 0.4]}, sources=2)["density"]
            (0.2, 0.4)
        """
        by_key = {p.key: p for p in self.params} | {p.name: p for p in self.params}
        unknown = [k for k in given if k not in by_key]
        if unknown:
            valid = ", ".join(p.key for p in self.params) or "none"
            raise InvalidParameter(
                f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))} (its parameters: {valid})",
                parameter=str(unknown[0]),
            )
        values = {p.name: p.default for p in self.params}
        for key, value in given.items():
            param = by_key[key]
            values[param.name] = param.coerce(value, self.name)
        if sources is not None:
            for p in self.params:
                if not p.per_source:
                    continue
                value = values[p.name]
                if isinstance(value, tuple) and len(value) != sources:
                    raise InvalidParameter(
                        f"method {self.name!r}: parameter {p.key!r} has {len(value)} values for {sources} "
                        "source(s); give one value, or one per source", parameter=p.key,
                    )
                values[p.name] = per_source(value, sources)
        if self.check is not None:
            problem = self.check(values)
            if problem:
                raise InvalidParameter(f"method {self.name!r}: {problem}")
        return values

    def check_source_count(self, count: int) -> None:
        if count < self.min_sources or (self.max_sources is not None and count > self.max_sources):
            if self.max_sources == self.min_sources:
                need = f"exactly {self.min_sources}"
            elif self.max_sources is None:
                need = f"at least {self.min_sources}"
            else:
                need = f"between {self.min_sources} and {self.max_sources}"
            raise InvalidParameter(f"method {self.name!r} needs {need} sources, got {count}")


def check_signature(name: str, function: Callable[..., Any], params: Sequence[Param]) -> None:
    """Refuse a method whose function's keyword arguments differ from its parameters' names.

    The function takes the module's inputs first (positionally), then every parameter by name,
    with nothing else: an extra, missing or misspelt name would otherwise fail (or be silently
    ignored) only when a merge reaches the first module.

    Example:
        >>> def scaled(inputs, *, lambda_): ...
        >>> check_signature("scaled", scaled, [Param("lambda_", 1.0, float, "scale")])
        >>> check_signature("scaled", scaled, [Param("lamda", 1.0, float, "scale")])
        Traceback (most recent call last):
        ...
        TypeError: method 'scaled': scaled() takes keyword argument(s) lambda_ but its parameters are lamda; ...
    """
    signature = inspect.signature(function)
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    keywords += [p.name for p in positional[1:]]
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values())
    declared = [p.name for p in params]
    if len(positional) < 1 or variadic or sorted(keywords) != sorted(declared) or len(set(declared)) != len(declared):
        takes = ", ".join(keywords) or "none"
        names = ", ".join(declared) or "none"
        raise TypeError(
            f"method {name!r}: {getattr(function, '__name__', 'its function')}() takes keyword argument(s) {takes} "
            f"but its parameters are {names}; the function must take the module inputs, then exactly one keyword "
            "argument per Param"
        )


def unit_interval(low_open: bool = True) -> Callable[[float], str | None]:
    """A check for values in (0, 1] (or [0, 1] with ``low_open=False``)."""

    def check(value: float) -> str | None:
        ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
        return None if ok else ("must be in (0, 1]" if low_open else "must be in [0, 1]")

    return check
