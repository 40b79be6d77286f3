"""The command-line interface. Each command lives in its own module and only parses arguments."""

from loramerge.cli.app import main
from loramerge.cli.combine import combine
from loramerge.cli.convert import convert
from loramerge.cli.demo import demo
from loramerge.cli.inspect_adapter import inspect
from loramerge.cli.methods import methods
from loramerge.cli.push import push
from loramerge.cli.run import run

for command in (combine, convert, demo, inspect, methods):
    main.add_command(command)
main.add_command(push)
main.add_command(run)

__all__ = ["main"]
