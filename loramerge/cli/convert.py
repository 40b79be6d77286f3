"""``loramerge convert``: rewrite an adapter in another format."""

from __future__ import annotations

import click

from loramerge.cli.options import WRITE_FORMATS, source_options
from loramerge.convert import convert as run
from loramerge.devices import DTYPE_CHOICES


@click.command()
@click.argument("source")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output file (kohya) or folder (peft, diffusers).")
@click.option("--to", "to", type=click.Choice(WRITE_FORMATS), help="Output format [default: the source's format].")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), help="Stored dtype [default: the source's dtype].")
@click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output.")
@source_options
def convert(source: str, output: str, to: str | None, dtype: str | None, force: bool, allow_pickle: bool,
            from_format: str | None, base: str | None) -> None:
    """Rewrite the SOURCE adapter in another format; every module's update stays the same.

    \b
    Examples:
      loramerge convert lora.safetensors -o lora-diffusers --to diffusers
      loramerge convert ./diffusers-lora -o lora.safetensors --to kohya
      loramerge convert loha.safetensors -o locon.safetensors --to kohya     # exact B@A expansion
      loramerge convert lora.safetensors -o peft-dir --to peft --dtype bf16
    """
    path = run(source, output, to=to, dtype=dtype, force=force, from_format=from_format, base=base,
               allow_pickle=allow_pickle)
    click.echo(f"wrote {path}")
