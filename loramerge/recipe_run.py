"""Planning and running a recipe: load its sources, resolve each module's settings, merge, publish.

:func:`plan_recipe` is what ``loramerge run --dry-run`` prints; :func:`run_recipe` runs the merge
with the per-module settings through :func:`loramerge.merge`'s ``overrides`` hook and writes the
output with its model card and the recipe as it ran (see :mod:`loramerge.publish`). A recipe
with ``base_model`` folds instead (see :mod:`loramerge.recipe_fold`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.adapter import Adapter
from loramerge.errors import LoramergeError, RecipeError, UnsupportedAdapter
from loramerge.overrides import module_settings
from loramerge.recipe import Recipe, load_recipe, saved_recipe
from loramerge.schedule import NO_VALUE, depths

if TYPE_CHECKING:
    from loramerge.fold import FoldResult


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
        """The per-module hook for :func:`loramerge.merge`."""
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
            lines.append(f"  {i}. {spec.spelling} -> {resolved} ({len(adapter)} modules, {adapter.source_format})")
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
    """Load every source of ``recipe`` (downloading Hub sources), naming the recipe line on failure."""
    from loramerge.sources import load

    adapters = []
    for i, s in enumerate(recipe.sources):
        target: Any = s.hub if s.hub is not None else (s.local if s.local is not None else s.spelling)
        try:
            adapters.append(load(target, format=s.format, allow_pickle=recipe.allow_pickle))
        except LoramergeError as exc:
            raise type(exc)(f"{s.where}: sources[{i}]: {exc}") from None
    return adapters


def plan_recipe(recipe: Recipe, adapters: Sequence[Adapter] | None = None) -> RecipePlan:
    """Load the sources (unless given) and resolve every module's weights, parameters and rank policy.

    The per-module values are checked here exactly as the merge will check them, so a dry run
    fails where the real run would.
    """
    from loramerge.linalg import RankPolicy
    from loramerge.plan import plan_merge

    loaded = list(adapters) if adapters is not None else load_sources(recipe)
    fold_lines: list[str] = []
    if recipe.base_model:
        from loramerge.recipe_fold import fold_description, folds_sequentially

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


# --------------------------------------------------------------------------- running


def run_recipe(recipe: Recipe | str | Path, *, sets: Sequence[str] = (), output: str | Path | None = None,
               force: bool = False, device: str = "auto", progress: bool = False,
               push_to_hub: str | None = None, private: bool | None = None,
               commit_message: str | None = None) -> Adapter | FoldResult:
    """Run a recipe: load, merge with per-module settings, write ``output`` (with its model card and
    ``loramerge_recipe.yaml``) and push when asked. Returns the merged adapter.

    ``output`` overrides ``output.path``; ``push_to_hub`` overrides ``output.push``. With neither
    an output path nor a push, nothing is written and the adapter is only returned.

    A fold recipe (one with ``base_model``) writes the base model with the sources folded in and
    returns the :class:`~loramerge.fold.FoldResult`; it needs an output path or a push.
    """
    from loramerge.merge import merge
    from loramerge.output import check_output

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, sets)
    elif sets:
        raise RecipeError("--set applies to a recipe file, not to a Recipe object")
    target = Path(output) if output is not None else recipe.output.path
    if target is not None:
        check_output(target, force=force)
    push = recipe.output.push
    repo = push_to_hub or (push.repo if push else None)
    private = private if private is not None else (push.private if push else False)
    commit_message = commit_message or (push.commit_message if push else None)
    if repo is not None:
        from loramerge.hub import check_push

        check_push(repo)  # before any heavy work: no token, offline or a bad target fail here
    if recipe.base_model:
        from loramerge.recipe_fold import run_fold_recipe

        return run_fold_recipe(recipe, target, force=force, device=device, progress=progress, repo=repo,
                               private=private, commit_message=commit_message)
    plan = plan_recipe(recipe)
    constants = _constant_settings(recipe)
    merged = merge(
        plan.adapters, method=recipe.method, seed=recipe.seed, device=device, dtype=recipe.output.dtype,
        compute_dtype=recipe.compute_dtype, ignore_base_mismatch=recipe.ignore_base_mismatch, progress=progress,
        overrides=plan.overrides(), **constants,
    )
    if target is None and repo is None:
        return merged
    from loramerge.publish import publish_merge

    saved = saved_recipe(recipe, plan.adapters, target)
    publish_merge(
        merged, target, format=recipe.output.format, dtype=recipe.output.dtype, force=force,
        card=recipe.output.card, recipe=saved, description=recipe.description, repo_id=repo,
        private=private, commit_message=commit_message,
    )
    return merged


def _constant_settings(recipe: Recipe) -> dict[str, Any]:
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
