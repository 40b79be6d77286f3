"""The ``loramerge`` click group and its error handling: one clear line, a non-zero exit, no traceback.

This is the one place where foreign exceptions meet the user:

* a :class:`~loramerge.errors.LoramergeError` prints its message as ``error: <message>`` (exit 1);
* Ctrl-C prints what is true: whether an output was already moved into place (exit 130);
* ``MemoryError`` prints one line (exit 1);
* any other exception is a bug: one ``error: internal error …`` line with a hint to rerun with
  ``--debug`` (exit 1). With ``--debug`` (or ``LORAMERGE_DEBUG=1``, which the test suite sets) it
  is re-raised with its traceback, so no bug is ever hidden from a test.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

from loramerge._version import __version__
from loramerge.errors import LoramergeError, LoramergeWarning
from loramerge.io.output import committed_outputs, reset_committed

DEBUG_ENV = "LORAMERGE_DEBUG"


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with spaces.

    Example:
        >>> one_line("bad value\\n  in line 2")
        'bad value in line 2'
    """
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """True with ``--debug`` on the command line or ``LORAMERGE_DEBUG`` set to a true value."""
    if ctx is not None and (ctx.find_root().params.get("debug") or (ctx.obj or {}).get("debug")):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def interrupted_message() -> str:
    """What Ctrl-C left behind: the outputs already in place, or that none was written."""
    done = committed_outputs()
    if not done:
        return "interrupted; no output was written"
    listed = ", ".join(str(p) for p in done)
    return f"interrupted after the output was written ({listed} is complete); what came after it did not run"


class LoramergeGroup(click.Group):
    """A click group that turns :class:`LoramergeError` into ``error: <message>`` and exit status 1,
    prints a :class:`LoramergeWarning` as one ``warning: <message>`` line, and turns every other
    exception into one line (or, with ``--debug``, its traceback)."""

    def invoke(self, ctx: click.Context) -> object:
        default_show = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, LoramergeWarning):
                click.echo(f"warning: {one_line(str(message))}", err=True)
            else:
                default_show(message, category, *args, **kwargs)

        warnings.showwarning = show
        reset_committed()
        try:
            return super().invoke(ctx)
        except LoramergeError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(interrupted_message(), err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except MemoryError:
            click.echo("error: out of memory; try a smaller --shard-size, fewer sources, or --device cpu", err=True)
            sys.exit(1)
        except Exception as exc:
            if debug_enabled(ctx):
                raise
            reason = one_line(str(exc)) or "no message"
            click.echo(f"error: internal error ({type(exc).__name__}: {reason}); this is a bug in loramerge; "
                       "rerun with --debug for the traceback and report it", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = default_show


@click.group(cls=LoramergeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loramerge")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error (also LORAMERGE_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compose and merge LoRA adapters exactly and fast.

    \b
    Examples:
      loramerge demo
      loramerge inspect ./my-adapter
      loramerge combine ./a ./b -o merged --weights 0.7,0.3
      loramerge combine ./a ./b -o merged --method svd --rank 16
      loramerge methods
      loramerge --debug fold ./llama ./adapter -o out    # full traceback if something unexpected fails
    """
    ctx.ensure_object(dict)["debug"] = debug
