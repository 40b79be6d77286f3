"""Planning a recipe: load its sources and resolve each module's weights, parameters and rank policy.

:func:`plan_recipe` is what ``loramerge run --dry-run`` prints, and both runs (merge and fold) start
from it. A recipe with ``base_model`` folds; :func:`folds_sequentially` and :func:`varies_by_module`
say how (see :mod:`loramerge.recipe.fold`).
"""


from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.core.adapter import Adapter
from loramerge.errors import LoramergeError, UnsupportedAdapter
from loramerge.merge.overrides import module_settings
from loramerge.merge.schedule import NO_VALUE, depths
from loramerge.recipe.model import Recipe


@dataclass(frozen=True)
class ModulePlan:
    """One module's settings: depth ``t``, per-source weights, method parameters and rank policy."""

    module: str
    t: float
    weights: list[float]
    params: dict[str, Any]
    policy: dict[str, Any]
    present: tuple[bool, ...] = ()

    def override(self) -> dict[str, Any]:
        return {"weights": self.weights, **self.params, **self.policy}


@dataclass
class RecipePlan:
    """A recipe with its sources loaded and every module's settings resolved."""

    recipe: Recipe
    adapters: list[Adapter]
    modules: list[ModulePlan]
    fold: list[str] = field(default_factory=list)

    def overrides(self) -> Callable[[str], Mapping[str, Any]]:
        """The per-module hook for :func:`loramerge.merge.engine`."""
        table = {m.module: m.override() for m in self.modules}
        return lambda module: table[module]

    def describe(self) -> str:
        """The plan as text: the resolved sources, then one line per module with its settings."""
        r = self.recipe
        lines = [f"recipe: {r.file or '<recipe>'}", f"method: {r.method} (seed {r.seed})", "sources:"]
        for i, (spec, adapter) in enumerate(zip(r.sources, self.adapters)):
            origin = adapter.origin
            if "repo_id" in origin:
                resolved = f"Hub {origin['repo_id']} at commit {origin.get('commit', '?')}"
            else:
                resolved = origin.get("path", adapter.source or "")
            weighted = spec.block_weights or r.block_weights
            shown = f", block weights {weighted.describe()}" if weighted is not None else ""
            lines.append(f"  {i}. {spec.spelling} -> {resolved} ({len(adapter)} modules, {adapter.source_format}{shown})")
        lines += self.fold
        out = r.output
        target = str(out.path) if out.path else "(not written)"
        lines.append(f"output: {target}" + (" (model folder)" if r.base_model and out.path else "")
                     + (f", format {out.format}" if out.format else "")
                     + (f", dtype {out.dtype}" if out.dtype else "")
                     + (f", shards of at most {out.shard_size}" if out.shard_size else "")
                     + (f", push to {out.push.repo}" if out.push else ""))
        lines.append(f"modules ({len(self.modules)}):")
        width = max((len(m.module) for m in self.modules), default=10)
        for m in self.modules:
            shown = [f"{w:g}" if here else "-" for w, here in zip(m.weights, m.present or [True] * len(m.weights))]
            settings = [f"weights {','.join(shown)}"]
            settings += [f"{k} {_show(v)}" for k, v in {**m.policy, **m.params}.items()]
            lines.append(f"  {m.module:<{width}}  t={m.t:.2f}  " + "  ".join(settings))
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_sources(recipe: Recipe) -> list[Adapter]:
    """Load every source of ``recipe`` (downloading Hub sources), naming the recipe line on failure, and
    weight each by block (``block_weights``, a source's own or the recipe's)."""
    from loramerge.io.sources import load
    from loramerge.merge.blocks import BlockWeighting, weigh_blocks

    adapters = []
    for i, s in enumerate(recipe.sources):
        target: Any = s.hub if s.hub is not None else (s.local if s.local is not None else s.spelling)
        try:
            adapters.append(load(target, format=s.format, allow_pickle=recipe.allow_pickle, component=s.component))
        except LoramergeError as exc:
            raise type(exc)(f"{s.where}: sources[{i}]: {exc}") from None
    weighting = BlockWeighting(recipe.block_weights, {i: s.block_weights for i, s in enumerate(recipe.sources)
                                                      if s.block_weights is not None})
    try:
        return weigh_blocks(adapters, weighting)
    except LoramergeError as exc:
        keys = ["block_weights", *(f"sources[{i}].block_weights" for i in weighting.sources)]
        given = [k for k in keys if k in recipe.locations]
        where = f"{recipe.locations[given[0]]}: {given[0]}" if given else "block_weights"
        raise exc.with_context(f"{where}: {exc}") from None


def plan_recipe(recipe: Recipe, adapters: Sequence[Adapter] | None = None) -> RecipePlan:
    """Load the sources (unless given) and resolve every module's weights, parameters and rank policy.

    The per-module values are checked here exactly as the merge will check them, so a dry run
    fails where the real run would.
    """
    from loramerge.core.rank import RankPolicy
    from loramerge.merge.plan import plan_merge

    loaded = list(adapters) if adapters is not None else load_sources(recipe)
    fold_lines: list[str] = []
    if recipe.base_model:
        fold_lines = fold_description(recipe, loaded)
    if recipe.base_model and folds_sequentially(recipe):
        # Applied one after another, not merged: no merge checks (DoRA and full weights fold too).
        modules_list = list(dict.fromkeys(m for a in loaded for m in a.modules))
        terms: dict[str, list[Any]] = {m: [a.layers.get(m) for a in loaded] for m in modules_list}
    else:
        try:
            plan = plan_merge(loaded, ignore_base_mismatch=recipe.ignore_base_mismatch)
        except UnsupportedAdapter as exc:
            if not recipe.base_model:
                raise
            raise UnsupportedAdapter(
                f"{exc}; this fold recipe merges its sources first (its settings vary by module, or its method "
                "or rank option needs a merge), so fold such adapters with constant weights and method linear, "
                "which applies them one after another"
            ) from None
        modules_list, terms = plan.modules, plan.terms
    spec = recipe.spec
    t_of = depths(modules_list)
    n = len(loaded)
    defaults = {p.key: p.default for p in spec.params}
    per_source = sorted({k for s in recipe.sources for k in s.parameters})
    modules = []
    for module in modules_list:
        t = t_of[module]
        weights = []
        for s in recipe.sources:
            w = s.weight.at(module, t) if s.weight is not None else NO_VALUE
            weights.append(1.0 if w is NO_VALUE else float(w))
        params: dict[str, Any] = {}
        for key, sched in recipe.parameters.items():
            if key not in per_source and (v := sched.at(module, t)) is not NO_VALUE:
                params[key] = v
        for key in per_source:
            shared = recipe.parameters[key].at(module, t) if key in recipe.parameters else NO_VALUE
            values = []
            for s in recipe.sources:
                v = s.parameters[key].at(module, t) if key in s.parameters else NO_VALUE
                values.append(v if v is not NO_VALUE else (shared if shared is not NO_VALUE else defaults[key]))
            params[key] = values
        policy = {k: v for k, sched in recipe.policy.items() if (v := sched.at(module, t)) is not NO_VALUE}
        module_settings(spec, {}, [1.0] * n, RankPolicy(), {**params, **policy, "weights": weights}, module)
        present = tuple(term is not None for term in terms[module])
        modules.append(ModulePlan(module, t, weights, params, policy, present))
    return RecipePlan(recipe, loaded, modules, fold_lines)


def varies_by_module(recipe: Recipe) -> bool:
    """True when a weight, parameter or rank setting differs between modules, or a parameter is
    given per source: such a fold merges with per-module settings first.

    Example:
        >>> from loramerge.recipe.reader import parse_recipe
        >>> varies_by_module(parse_recipe("sources: [a, b]")), varies_by_module(parse_recipe(
        ...     "sources:\\n  - path: a\\n    weight: [0.2, 0.8]\\n"))
        (False, True)
    """
    return (any(s.weight is not None and not s.weight.is_constant for s in recipe.sources)
            or any(s.parameters for s in recipe.sources)
            or any(not p.is_constant for p in recipe.parameters.values())
            or any(not p.is_constant for p in recipe.policy.values()))


def folds_sequentially(recipe: Recipe) -> bool:
    """True when fold applies the sources one after another (``linear``/``cat``, no rank option, no
    method parameters, constant weights): no merge, so DoRA and full weights fold too.

    Example:
        >>> from loramerge.recipe.reader import parse_recipe
        >>> folds_sequentially(parse_recipe("sources: [a]")), folds_sequentially(parse_recipe(
        ...     "sources: [a]\\nmethod: svd\\nrank: 4\\n"))
        (True, False)
    """
    return recipe.method in ("linear", "cat") and not recipe.policy and not recipe.parameters \
        and not varies_by_module(recipe)


def fold_description(recipe: Recipe, adapters: Sequence[Adapter]) -> list[str]:
    """What ``--dry-run`` says about a fold: the base model, how the sources reach it and, for a local
    base model folder, which tensors change (from the headers alone; the same checks as the run)."""
    base = recipe.base_model or ""
    local = Path(base).is_dir()
    lines = [f"fold into: {base} ({'local model folder' if local else 'Hub model, downloaded when it runs'})"]
    if folds_sequentially(recipe):
        lines.append("fold: the sources one after another, W + Σ wᵢ·ΔWᵢ in float32, rounded once")
    elif varies_by_module(recipe):
        lines.append(f"fold: merge with {recipe.method} and the per-module settings below, then fold the merge")
    else:
        lines.append(f"fold: merge with {recipe.method}, then fold the merge")
    if local and (Path(base) / "config.json").is_file() and not (Path(base) / "model_index.json").exists():
        from loramerge.fold.plan import plan_fold
        from loramerge.io.checkpoint import open_checkpoint

        weights = [float(s.weight.spec) if s.weight is not None and s.weight.is_constant else 1.0
                   for s in recipe.sources]
        ckpt = open_checkpoint(base, allow_pickle=recipe.allow_pickle)
        try:
            plan = plan_fold(ckpt, list(zip(adapters, weights)), tied_mode=recipe.tied_embeddings)
        finally:
            ckpt.release()
        lines.append(f"fold plan: {plan.module_count} module update(s) into {len(plan.updates)} of "
                     f"{len(ckpt.tensors)} tensors")
        lines += [f"note: {note}" for note in plan.notes]
    return lines


def constant_settings(recipe: Recipe) -> dict[str, Any]:
    """Merge-wide values (weights, parameters, rank policy) where the recipe makes them constant,
    so the merge report records them; per-module values travel through the overrides hook."""
    out: dict[str, Any] = {}
    if all(s.weight is None or s.weight.is_constant for s in recipe.sources):
        out["weights"] = [float(s.weight.spec) if s.weight is not None else 1.0 for s in recipe.sources]
    per_source = {k for s in recipe.sources for k in s.parameters}
    for key, sched in recipe.parameters.items():
        if sched.is_constant and key not in per_source:
            out[key] = sched.spec
    policy = {k: s.spec for k, s in recipe.policy.items() if s.is_constant}
    if len(policy) == len(recipe.policy):
        out.update(policy)
    return out
