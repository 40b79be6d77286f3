"""``loramerge eval``: score the base model and adapters on evaluation data, one table."""

from __future__ import annotations

import click

from loramerge.cli.options import runtime_options
from loramerge.runtime.evaluate import evaluate as run_evaluate


@click.command(name="eval")
@click.argument("base")
@click.argument("adapters", nargs=-1)
@click.option("--data", "-d", multiple=True, required=True,
              help="A task: a JSONL file (named after the file) or NAME=FILE. Repeat for several tasks.")
@click.option("--paired", is_flag=True,
              help="Task i is adapter i's own task: also print scores normalized by the own adapter's.")
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N rows of each task.")
@click.option("--no-base", is_flag=True, help="Leave the base model out of the table.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write every figure as JSON.")
@runtime_options
def evaluate(base: str, adapters: tuple[str, ...], data: tuple[str, ...], paired: bool, limit: int | None,
             no_base: bool, json_path: str | None, device: str, model_dtype: str | None, batch_size: int,
             allow_pickle: bool) -> None:
    """Score BASE and each ADAPTER (or merged adapter) on every --data task, and print one table.

    A JSONL row is {"prompt", "completion"} (exact match of the completion under teacher forcing,
    token accuracy, loss), {"text"} (perplexity), {"prompt", "choices", "answer"} (multiple
    choice accuracy) or {"messages"} (chat template; the last assistant turn is scored). The
    prompt and completion are tokenized separately; a task's loss is token-weighted. The base
    model is loaded once and each adapter swapped in memory. Needs the eval extra:
    pip install "loramerge[eval]".

    \b
    Examples:
      loramerge eval ./llama ./math ./code --data math.jsonl --data code.jsonl
      loramerge eval ./llama ./math ./code ./merged --data math.jsonl --data code.jsonl --paired
      loramerge eval ./llama ./merged --data qa=val.jsonl --limit 200 --batch-size 16 --json scores.json
    """
    result = run_evaluate(base, list(adapters), list(data), paired=paired, include_base=not no_base, limit=limit,
                          batch_size=batch_size, device=device, dtype=model_dtype, allow_pickle=allow_pickle,
                          progress=True)
    click.echo(result.table())
    if json_path:
        result.write_json(json_path)
