"""The command-line interface. Each command lives in its own module and only parses arguments."""

from loramerge.cli.app import main
from loramerge.cli.combine import combine
from loramerge.cli.convert import convert
from loramerge.cli.demo import demo
from loramerge.cli.evaluate import evaluate
from loramerge.cli.extract import extract
from loramerge.cli.fold import fold
from loramerge.cli.inspect_adapter import inspect
from loramerge.cli.methods import methods
from loramerge.cli.push import push
from loramerge.cli.resize import resize
from loramerge.cli.run import run
from loramerge.cli.tune import tune
from loramerge.cli.verify import verify

for command in (combine, convert, demo, evaluate, extract, fold, inspect, methods, push, resize, run, tune,
                verify):
    main.add_command(command)

__all__ = ["main"]
