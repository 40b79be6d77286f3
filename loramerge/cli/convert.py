"""``loramerge convert``: rewrite an adapter in another format."""

from __future__ import annotations

import click

from loramerge.cli.options import WRITE_FORMATS, block_weights_option, push_options, source_options
from loramerge.convert import convert as run
from loramerge.core.devices import DTYPE_CHOICES
from loramerge.hub.cards import converted_card
from loramerge.hub.publish import publish_output
from loramerge.io.hub import check_push
from loramerge.io.output import check_output
from loramerge.io.sources import load


@click.command()
@click.argument("source")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output file (kohya) or folder (peft, diffusers).")
@click.option("--to", "to", type=click.Choice(WRITE_FORMATS), help="Output format [default: the source's format].")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), help="Stored dtype [default: the source's dtype].")
@click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output.")
@block_weights_option
@source_options
@push_options
def convert(source: str, output: str, to: str | None, dtype: str | None, force: bool, block_weights: tuple[str, ...],
            allow_pickle: bool, from_format: str | None, base: str | None, push_to_hub: str | None, private: bool,
            commit_message: str | None) -> None:
    """Rewrite the SOURCE adapter in another format; every module's update stays the same
    (times its block weight, with --block-weights).

    \b
    Examples:
      loramerge convert lora.safetensors -o lora-diffusers --to diffusers
      loramerge convert ./diffusers-lora -o lora.safetensors --to kohya
      loramerge convert loha.safetensors -o locon.safetensors --to kohya     # exact B@A expansion
      loramerge convert lora.safetensors -o peft-dir --to peft --dtype bf16
      loramerge convert org/sd-loras/pixel.safetensors -o pixel --to diffusers --push-to-hub me/pixel
      loramerge convert style.safetensors -o style-outs.safetensors --block-weights OUTS
    """
    check_output(output, force=force)
    if push_to_hub:
        check_push(push_to_hub)
    adapter = load(source, format=from_format, allow_pickle=allow_pickle, base=base)
    path = run(adapter, output, to=to, dtype=dtype, force=force, block_weights=block_weights)
    click.echo(f"wrote {path}")
    if push_to_hub:
        card = converted_card(adapter, format_name=to or adapter.source_format, repo_id=push_to_hub)
        pushed = publish_output(path, push_to_hub, private=private, commit_message=commit_message, card=card)
        click.echo(f"pushed to {pushed.repo_id} (commit {pushed.commit}): {pushed.url}")
