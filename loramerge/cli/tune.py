"""``loramerge tune``: search a merge's weights, λ and parameters on data, and write the best one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from loramerge.cli.options import card_options, method_param_options, method_params_from, output_options
from loramerge.hub.publish import add_data_to_recipe, publish_merge, recipe_from_report
from loramerge.io.output import check_output
from loramerge.tune.objective import AGGREGATES, METRICS
from loramerge.tune.plot import require_matplotlib
from loramerge.tune.run import tune as run_tune
from loramerge.tune.search import SAMPLERS


@click.command()
@click.argument("base")
@click.argument("sources", nargs=-1, required=True)
@click.option("--data", "-d", multiple=True, required=True,
              help="A task: a JSONL file (named after the file) or NAME=FILE. Repeat; with --paired, one per source.")
@output_options
@click.option("--method", "-m", default="linear", show_default=True,
              help="Merge method, or a comma-separated list to search over (then `method` joins --search).")
@click.option("--search", help="Dimensions to search: lambda, weights, a method parameter (density, gamma, epsilon, "
                               "off_diagonal, majority_sign, ...), method. [default: lambda,weights]")
@click.option("--bounds", multiple=True, metavar="NAME=LOW:HIGH",
              help="Override a dimension's range, e.g. lambda=0:1.5 or weights=-1:1 (comma-separated or repeated).")
@click.option("--budget", type=int, default=50, show_default=True, help="Search trials (the baselines come on top).")
@click.option("--timeout", help="Also stop after this long: seconds or 90s, 30m, 1h30m.")
@click.option("--holdout", type=float, default=0.3, show_default=True,
              help="Fraction of each task's rows kept out of the search, for the final comparison.")
@click.option("--objective", type=click.Choice(AGGREGATES), default="mean", show_default=True,
              help="Aggregate over tasks: the mean, or the worst task.")
@click.option("--metric", type=click.Choice(METRICS), default="score", show_default=True,
              help="score: accuracy where rows define one, else negative loss; loss; token_accuracy.")
@click.option("--l1", type=float, default=0.0, show_default=True,
              help="Penalty × mean |weight| subtracted from the objective (LoraHub uses 0.05).")
@click.option("--paired", is_flag=True, help="Task i is source i's own task: normalize each task by its own adapter.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits, the optimizer and the merge.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="auto", show_default=True,
              help="optuna sampler; auto: CMA-ES for ≥ 2 numeric dimensions, else TPE.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Candidates scored at once: processes (one per GPU where there are several), or Ray actors.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Send trials to the Ray cluster at HOST:PORT (needs loramerge[ray]); --workers actors.")
@click.option("--batch", type=click.IntRange(min=1), help="Candidates asked of the optimizer at a time "
                                                           "[default: --workers]; the result depends on it.")
@click.option("--no-fallback", is_flag=True, help="Write the search's best even when a cheap baseline scores better "
                                                  "on the holdout rows (the table still says so).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Record every trial here (after each batch).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from a record written by --json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of the objective per trial and the holdout scores (needs loramerge[plot]).")
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N rows of each task.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per forward pass [default: sized to the device].")
@click.option("--device", default="auto", show_default=True, help="Where the model runs and merges: auto, cpu, cuda[:N].")
@click.option("--model-dtype", help="Load the model in this dtype [default: the checkpoint's own].")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin checkpoints (read with weights_only=True).")
@card_options
@method_param_options
def tune(base: str, sources: tuple[str, ...], data: tuple[str, ...], output: str, dtype: str | None, force: bool,
         out_format: str | None, method: str, search: str | None, bounds: tuple[str, ...], budget: int,
         timeout: str | None, holdout: float, objective: str, metric: str, l1: float, paired: bool, seed: int,
         sampler: str, workers: int, ray_address: str | None, batch: int | None, no_fallback: bool,
         json_path: str | None,
         resume: str | None, plot_path: str | None, limit: int | None, batch_size: int | None, device: str,
         model_dtype: str | None, allow_pickle: bool, no_card: bool, **method_options: Any) -> None:
    """Search the best merge of SOURCE adapters for BASE on --data, and write it to -o OUTPUT.

    Each task's rows are split (seeded) into tune and holdout parts. optuna's CMA-ES or TPE
    proposes weights, λ and method parameters; each candidate is swapped into the resident base
    model and scored on the tune rows. At the end the holdout rows score the search's best next to
    the base model, each source alone, `linear` with weights 1 and `linear` with λ alone tuned; when
    the search does not beat those `linear` merges there, the output is the better of them, and the
    table says so. OUTPUT gets the merge, a model card and loramerge_recipe.yaml (`loramerge run`
    reproduces it). Ctrl-C or --timeout ends the search early and still writes the best so far;
    --resume continues a recorded run. Needs loramerge[tune].

    \b
    Examples:
      loramerge tune ./llama ./math ./code -d math.jsonl -d code.jsonl --paired -o tuned --budget 60
      loramerge tune ./llama ./a ./b ./c -d val.jsonl -o tuned -m ties --search lambda,weights,density
      loramerge tune ./llama ./a ./b -d a.jsonl -d b.jsonl --paired -o tuned -m ties,dare_ties --json tune.json
      loramerge tune ./llama ./a ./b -d a.jsonl -d b.jsonl -o tuned --json tune.json --resume tune.json
      loramerge tune ./llama ./a ./b -d a.jsonl -d b.jsonl -o tuned --workers 4 --timeout 30m
      loramerge tune /shared/llama /shared/a /shared/b -d a.jsonl -o tuned --ray 10.0.0.5:6379 --workers 8
    """
    check_output(output, force=force)
    if plot_path:
        require_matplotlib()
    result = run_tune(base, list(sources), list(data), method=method, search=search, budget=budget,
                      bounds=list(bounds) or None, params=method_params_from(method_options), holdout=holdout,
                      objective=objective, metric=metric, l1=l1, paired=paired, seed=seed, sampler=sampler,
                      workers=workers, ray=ray_address, batch=batch, fallback=not no_fallback, timeout=timeout, resume=resume,
                      record=json_path or resume, limit=limit, batch_size=batch_size, device=device,
                      dtype=model_dtype, allow_pickle=allow_pickle, progress=True)
    recipe = recipe_from_report(result.best, Path(output),
                                output={k: v for k, v in (("dtype", dtype), ("format", out_format)) if v} or None)
    files = statistics_files(result, Path(output))
    if recipe is not None and files:
        add_data_to_recipe(recipe, base, [str(f) for f in files], Path(output))
    publish_merge(result.best, output, format=out_format, dtype=dtype, force=force, card=not no_card,
                  recipe=recipe, description=f"Tuned with `loramerge tune`: {result.verdict()}")
    for file, rows in zip(files, (result.statistics_rows or {}).values()):
        if file.parent.parent.is_dir():  # a folder output: the recipe points at these rows
            write_jsonl_rows(file, rows)
    click.echo(result.report)
    if plot_path:
        result.plot(plot_path)
        click.echo(f"wrote {plot_path}")
    if json_path or resume:
        click.echo(f"recorded {len(result.trials)} trials in {json_path or resume}")
    click.echo(f"wrote {output} ({result.candidate.method}, {len(result.best)} modules)")


STATISTICS_FOLDER = "tune_data"


def statistics_files(result: Any, output: Path) -> list[Path]:
    """Where the rows behind a data-aware merge's statistics go, inside the output folder, one file per source."""
    if not result.statistics_rows:
        return []
    return [output.resolve() / STATISTICS_FOLDER / f"{name}.jsonl" for name in result.statistics_rows]


def write_jsonl_rows(file: Path, rows: list[dict[str, Any]]) -> None:
    import json

    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
