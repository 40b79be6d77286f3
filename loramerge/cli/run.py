"""``loramerge run``: run a YAML recipe, or print its plan."""

from __future__ import annotations

import click

from loramerge.cli.options import check_report, device_option, push_options, show_progress, write_report
from loramerge.core.adapter import Adapter
from loramerge.io.hub import check_push
from loramerge.recipe.plan import plan_recipe
from loramerge.recipe.reader import load_recipe
from loramerge.recipe.run import run_recipe


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Change the recipe before it runs; VALUE is YAML (e.g. sources.0.weight=0.7). Repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the plan (sources, modules, per-module settings) and stop.")
@click.option("--output", "-o", type=click.Path(), help="Output path [default: the recipe's output.path].")
@click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output.")
@device_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write per-module statistics as JSON.")
@push_options
def run(recipe_path: str, sets: tuple[str, ...], dry_run: bool, output: str | None, force: bool, device: str,
        report_path: str | None, push_to_hub: str | None, private: bool, commit_message: str | None) -> None:
    """Run the merge described by the YAML file RECIPE (or, with base_model, the fold).

    The output gets a model card and loramerge_recipe.yaml, the exact recipe with Hub sources
    pinned to their commits, so `loramerge run OUTPUT/loramerge_recipe.yaml -o AGAIN` reproduces
    it. See recipes/ for examples.

    \b
    Examples:
      loramerge demo --save demo-out && loramerge run recipes/svd-energy.yaml
      loramerge run recipes/linear.yaml --set base_dir=/data/demo --set sources.0.weight=0.7
      loramerge run recipe.yaml --dry-run
      loramerge run recipe.yaml -o merged --push-to-hub me/merged-lora
      loramerge run recipes/fold.yaml          # a recipe with base_model: folds into that model
    """
    check_report(report_path, force)
    recipe = load_recipe(recipe_path, sets)
    if recipe.translated_from == "mergekit":
        click.echo(f"note: {recipe_path} is a mergekit config; running it as a LoRA merge with mergekit's semantics "
                   f"({len(recipe.sources)} LoRA(s) folded into {recipe.base_model})")
    if dry_run:
        click.echo(plan_recipe(recipe).describe())
        return
    target = output or (str(recipe.output.path) if recipe.output.path else None)
    repo = push_to_hub or (recipe.output.push.repo if recipe.output.push else None)
    if target is None and repo is None:
        raise click.UsageError("no output: give -o OUTPUT, set output.path in the recipe, or push with --push-to-hub")
    if repo:
        check_push(repo)
    done = run_recipe(recipe, output=output, force=force, device=device, progress=show_progress(), push_to_hub=push_to_hub,
                      private=True if private else None, commit_message=commit_message)
    if not isinstance(done, Adapter):  # a fold recipe
        if done.merge_report is not None:
            click.echo(done.merge_report.summary())
        write_report(report_path, done.merge_report.to_dict() if done.merge_report is not None else done.recipe,
                     force)
        for note in done.warnings:
            click.echo(f"note: {note}")
        if target:
            click.echo(done.summary())
        if repo:
            click.echo(f"pushed to {repo}")
        return
    report = done.report
    assert report is not None
    write_report(report_path, report.to_dict(), force)
    click.echo(report.summary())
    if target:
        click.echo(f"wrote {target} ({report.method}, {len(done)} modules, {report.seconds:.2f}s)")
    if repo:
        click.echo(f"pushed to {repo}")
