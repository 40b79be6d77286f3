"""``loramerge demo``: build a tiny model and adapters locally and merge them with every method."""

from __future__ import annotations

from pathlib import Path

import click

from loramerge.demo import DEMO_ADAPTERS, DEMO_WEIGHTS
from loramerge.demo import demo as run
from loramerge.io.output import check_output


@click.command()
@click.option("--save", "save_dir", type=click.Path(file_okay=False), help="Keep the base model, adapters and merges here.")
@click.option("--force", is_flag=True, help="Reuse a non-empty --save folder.")
def demo(save_dir: str | None, force: bool) -> None:
    """Build a tiny Llama-shaped model and three PEFT adapters (no network), merge them with
    every method and print each method's output rank, error against the exact sum and time.

    \b
    Examples:
      loramerge demo
      loramerge demo --save demo-out
      loramerge combine demo-out/adapters/math demo-out/adapters/code -o merged --method svd
    """
    if save_dir:
        check_output(save_dir, force=force)
    click.echo(f"adapters: {', '.join(DEMO_ADAPTERS)}; weights {', '.join(map(str, DEMO_WEIGHTS))}")
    click.echo(run(Path(save_dir) if save_dir else None, force=force))
    if save_dir:
        click.echo(f"\nsaved: {save_dir}/base-model, {save_dir}/adapters/<name>, {save_dir}/merged/<method>")
