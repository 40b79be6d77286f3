"""Per-module settings for a merge: method parameters, source weights and the rank policy.

:func:`loramerge.merge.engine` takes ``overrides``, a function of the module path that returns the
settings that differ for that module (recipes build it from filters and per-layer gradients).
Keys are method parameter names, ``weights`` (one per source), and the rank-policy keys
``rank``, ``energy``, ``max_error``, ``sv_ratio``, ``sv_cumulative`` and ``rank_max``. What is not
returned keeps the merge-wide value. Setting any target (all but ``rank_max``) replaces the
merge-wide choice among them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from loramerge.core.rank import POLICY_FIELDS, TARGET_FIELDS, RankPolicy
from loramerge.errors import InvalidParameter, LoramergeError
from loramerge.merge.methods import MergeMethod

Overrides = Callable[[str], Mapping[str, Any]]
POLICY_KEYS = POLICY_FIELDS


@dataclass(frozen=True)
class ModuleSettings:
    """What one module is merged with."""

    params: dict[str, Any]
    weights: list[float]
    policy: RankPolicy


def module_settings(spec: MergeMethod, given: Mapping[str, Any], weights: Sequence[float], policy: RankPolicy,
                    override: Mapping[str, Any], module: str) -> ModuleSettings:
    """The merge-wide ``given`` parameters, ``weights`` and ``policy`` with ``override`` applied.

    Example:
        >>> from loramerge.merge.methods import get_method
        >>> s = module_settings(get_method("svd"), {}, [1.0, 1.0], RankPolicy(rank=8),
        ...                     {"weights": [0.5, 2], "energy": 0.9}, "m")
        >>> s.weights, s.policy
        ([0.5, 2.0], RankPolicy(rank=None, energy=0.9, max_error=None, rank_max=None, sv_ratio=None, sv_cumulative=None))
    """
    try:
        params = {k: v for k, v in override.items() if k != "weights" and k not in POLICY_KEYS}
        resolved = spec.resolve({**given, **params})
        new_weights = list(weights)
        if "weights" in override:
            new_weights = [float(w) for w in override["weights"]]
            if len(new_weights) != len(weights):
                raise InvalidParameter(f"got {len(new_weights)} weight(s) for {len(weights)} source(s)",
                                       parameter="weights")
        new_policy = policy
        chosen = {k: override[k] for k in POLICY_KEYS if override.get(k) is not None}
        if chosen:
            if set(TARGET_FIELDS) & chosen.keys():
                new_policy = RankPolicy(rank_max=policy.rank_max)
            new_policy = replace(new_policy, **chosen)
            if not spec.accepts_rank and not new_policy.is_exact:
                raise InvalidParameter(f"method {spec.name!r} keeps rank Σ rᵢ and takes no rank option",
                                       parameter="rank")
    except LoramergeError as exc:
        raise exc.with_context(f"module {module}: {exc}", module=module) from None
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(f"module {module}: bad override ({exc})", module=module) from None
    return ModuleSettings(resolved, new_weights, new_policy)
