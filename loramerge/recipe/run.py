"""Running a recipe: merge with the per-module settings, then write and publish the output.

:func:`run_recipe` runs the merge through :func:`loramerge.merge.engine.merge`'s ``overrides`` hook
with the settings of :func:`~loramerge.recipe.plan.plan_recipe` and writes the output with its model
card and the recipe as it ran (see :mod:`loramerge.hub.publish`). A recipe with ``base_model`` folds
instead (see :mod:`loramerge.recipe.fold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loramerge.core.adapter import Adapter
from loramerge.errors import RecipeError
from loramerge.recipe.fold import run_fold_recipe
from loramerge.recipe.model import Recipe, saved_recipe
from loramerge.recipe.plan import constant_settings, plan_recipe
from loramerge.recipe.reader import load_recipe

if TYPE_CHECKING:
    from loramerge.fold.job import FoldResult


def run_recipe(recipe: Recipe | str | Path, *, sets: Sequence[str] = (), output: str | Path | None = None,
               force: bool = False, device: str = "auto", progress: bool = False,
               push_to_hub: str | None = None, private: bool | None = None,
               commit_message: str | None = None) -> Adapter | FoldResult:
    """Run a recipe: load, merge with per-module settings, write ``output`` (with its model card and
    ``loramerge_recipe.yaml``) and push when asked. Returns the merged adapter.

    ``output`` overrides ``output.path``; ``push_to_hub`` overrides ``output.push``. With neither
    an output path nor a push, nothing is written and the adapter is only returned.

    A fold recipe (one with ``base_model``) writes the base model with the sources folded in and
    returns the :class:`~loramerge.fold.job.FoldResult`; it needs an output path or a push.
    """
    from loramerge.io.output import check_output
    from loramerge.runtime.merging import merge

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
        from loramerge.io.hub import check_push

        check_push(repo)  # before any heavy work: no token, offline or a bad target fail here
    if recipe.base_model:
        return run_fold_recipe(recipe, target, force=force, device=device, progress=progress, repo=repo,
                               private=private, commit_message=commit_message)
    plan = plan_recipe(recipe)
    constants = constant_settings(recipe)
    merged = merge(
        plan.adapters, method=recipe.method, seed=recipe.seed, device=device, dtype=recipe.output.dtype,
        compute_dtype=recipe.compute_dtype, ignore_base_mismatch=recipe.ignore_base_mismatch, progress=progress,
        overrides=plan.overrides(), model=recipe.model, stats=recipe.stats, allow_pickle=recipe.allow_pickle,
        data=[s.data for s in recipe.sources] if recipe.spec.needs_statistics else None, **constants,
    )
    if target is None and repo is None:
        return merged
    from loramerge.hub.publish import publish_merge

    saved = saved_recipe(recipe, plan.adapters, target)
    publish_merge(
        merged, target, format=recipe.output.format, dtype=recipe.output.dtype, force=force,
        card=recipe.output.card, recipe=saved, description=recipe.description, repo_id=repo,
        private=private, commit_message=commit_message,
    )
    return merged
