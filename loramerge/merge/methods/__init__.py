"""The method registry. Each family lives in one module here; adding a method is one line below.

Example:
    >>> from loramerge.merge.methods import get_method
    >>> get_method("svd").default_rank
    'max_source_rank'
"""

from __future__ import annotations

from dataclasses import replace

from loramerge.errors import InvalidParameter
from loramerge.merge.methods import (
    breadcrumbs,
    core_space,
    dare,
    della,
    iso,
    knots,
    linear,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from loramerge.merge.methods.base import MergeMethod, MethodOutput, ModuleInputs, Param, module_seed

_FAMILIES = (
    linear.METHODS,
    task_arithmetic.METHODS,
    ties.METHODS,
    dare.METHODS,
    breadcrumbs.METHODS,
    della.METHODS,
    knots.METHODS,
    tsv.METHODS,
    iso.METHODS,
    core_space.METHODS,
    slerp.METHODS,
    regmean.METHODS,
)

REGISTRY: dict[str, MergeMethod] = {m.name: m for family in _FAMILIES for m in family}


def canonical_name(name: str) -> str:
    """A method name with hyphens accepted for underscores, lower-cased (``dare-ties`` → ``dare_ties``)."""
    return name.strip().lower().replace("-", "_")


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``, or :class:`InvalidParameter` listing the valid names."""
    method = REGISTRY.get(canonical_name(name))
    if method is None:
        raise InvalidParameter(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)}", parameter="method")
    return method


def available_methods() -> list[MergeMethod]:
    """All registered methods, in registry order."""
    return list(REGISTRY.values())


def all_params() -> list[Param]:
    """Every distinct parameter any method takes (the CLI turns each into one option).

    A parameter several methods share appears once, with the union of their choices, and with
    default ``None`` when the methods' defaults differ (each method fills in its own).
    """
    seen: dict[str, Param] = {}
    for method in REGISTRY.values():
        for p in method.params:
            first = seen.setdefault(p.key, p)
            if first is p:
                continue
            choices = first.choices
            if first.choices is not None and p.choices is not None:
                choices = tuple(dict.fromkeys(first.choices + p.choices))
            default = first.default if first.default == p.default else None
            seen[p.key] = replace(first, choices=choices, default=default)
    return list(seen.values())


__all__ = [
    "REGISTRY",
    "MergeMethod",
    "MethodOutput",
    "ModuleInputs",
    "Param",
    "all_params",
    "available_methods",
    "canonical_name",
    "get_method",
    "module_seed",
]
