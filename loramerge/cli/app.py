"""The ``loramerge`` click group and its error handling: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import click

from loramerge._version import __version__
from loramerge.errors import LoramergeError, LoramergeWarning


class LoramergeGroup(click.Group):
    """A click group that turns :class:`LoramergeError` into ``error: <message>`` and exit status 1,
    and prints a :class:`LoramergeWarning` as one ``warning: <message>`` line."""

    def invoke(self, ctx: click.Context) -> object:
        default_show = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, LoramergeWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                default_show(message, category, *args, **kwargs)

        warnings.showwarning = show
        try:
            return super().invoke(ctx)
        except LoramergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)
        finally:
            warnings.showwarning = default_show


@click.group(cls=LoramergeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loramerge")
def main() -> None:
    """Compose and merge LoRA adapters exactly and fast.

    \b
    Examples:
      loramerge demo
      loramerge inspect ./my-adapter
      loramerge combine ./a ./b -o merged --weights 0.7,0.3
      loramerge combine ./a ./b -o merged --method svd --rank 16
      loramerge methods
    """
