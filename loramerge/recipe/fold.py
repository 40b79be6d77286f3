"""Fold recipes: a recipe with ``base_model`` writes that model with its sources folded into the weights.

When every setting is the same for all modules, the recipe makes exactly the call
``loramerge fold`` makes: ``linear``/``cat`` without a rank option fold the sources one after
another (their exact weighted sum, with DoRA, ``lora_bias`` and full weights folded as PEFT does),
and any other method merges first and folds the merge. Settings that vary by module (filter rules,
per-layer gradients, per-source parameters) go through :func:`loramerge.merge.engine`'s per-module hook
first, and the merged adapter is folded; such a merge refuses what it cannot carry (DoRA, full
weights), and the error says so.

``output.path`` is the model folder, ``output.dtype`` the stored dtype of its floating tensors
(``keep`` by default), ``output.shard_size`` re-shards it, and ``tied_embeddings`` is fold's
``tied_embeddings_mode``. The folder gets a model card and the recipe as it ran, with the base
model and Hub sources pinned to their commits, so ``loramerge run`` on it folds the same model.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramerge.core.adapter import Adapter
from loramerge.errors import RecipeError
from loramerge.recipe.model import RECIPE_FILENAME, Recipe, dump_recipe, saved_recipe
from loramerge.recipe.plan import constant_settings, load_sources, plan_recipe, varies_by_module

if TYPE_CHECKING:
    from loramerge.fold.job import FoldResult


def run_fold_recipe(recipe: Recipe, target: Path | None, *, force: bool = False, device: str = "auto",
                    progress: bool = False, repo: str | None = None, private: bool = False,
                    commit_message: str | None = None) -> FoldResult:
    """Fold ``recipe``'s sources into its ``base_model`` and write the model to ``target`` (with its
    card and recipe) and/or push it to ``repo``. Called by :func:`loramerge.run_recipe`."""
    from loramerge.fold.engine import fold
    from loramerge.hub.publish import RECIPE_HEADER, model_location, output_card, publish_output
    from loramerge.io.hub import model_origin
    from loramerge.io.output import atomic_output
    from loramerge.merge.engine import merge

    if target is None and repo is None:
        where = recipe.locations.get("base_model", str(recipe.file or "<recipe>"))
        raise RecipeError(f"{where}: base_model: a fold recipe writes a model folder; give output.path, "
                          "-o OUTPUT or a push")
    adapters = load_sources(recipe)
    constants = constant_settings(recipe)
    settings: dict[str, Any] = dict(
        dtype=recipe.output.dtype or "keep", shard_size=recipe.output.shard_size, device=device,
        compute_dtype=recipe.compute_dtype, tied_embeddings_mode=recipe.tied_embeddings, force=True,
        allow_pickle=recipe.allow_pickle, ignore_base_mismatch=recipe.ignore_base_mismatch, progress=progress,
    )
    merged: Adapter | None = None
    if varies_by_module(recipe):
        plan = plan_recipe(recipe, adapters)  # refuses DoRA and full weights, which a merge cannot carry
        merged = merge(adapters, method=recipe.method, seed=recipe.seed, device=device, dtype=torch.float32,
                       compute_dtype=recipe.compute_dtype, ignore_base_mismatch=recipe.ignore_base_mismatch,
                       progress=progress, overrides=plan.overrides(), **constants)
    with ExitStack() as stack:
        if target is not None:
            folder = stack.enter_context(atomic_output(target, force=force))
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loramerge-fold-"))) / "model"
        if merged is not None:
            result = fold(recipe.base_model, merged, output=folder, **settings)  # type: ignore[arg-type]
            result.merge_report = merged.report
            assert merged.report is not None
            result.recipe["merge"] = {"totals": merged.report.totals()}
        else:
            result = fold(recipe.base_model, adapters, output=folder, method=recipe.method,  # type: ignore[arg-type]
                          seed=recipe.seed, **constants, **settings)
        base = model_location(model_origin(result.recipe["base"]["source"]), target)
        saved = saved_recipe(recipe, adapters, target, base_model=base)
        card = output_card(folder, None, adapters=adapters, recipe=saved, description=recipe.description,
                           record=result.recipe)
        if recipe.output.card:
            (folder / "README.md").write_text(card or "", encoding="utf-8")
            (folder / RECIPE_FILENAME).write_text(dump_recipe(saved, RECIPE_HEADER), encoding="utf-8")
        if target is None:
            publish_output(folder, repo, private=private, commit_message=commit_message,  # type: ignore[arg-type]
                           card=card, recipe=saved)
    if target is not None:
        result.path = Path(target)
        if repo is not None:
            publish_output(target, repo, private=private, commit_message=commit_message, card=card, recipe=saved)
    return result
