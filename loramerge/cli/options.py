"""Option groups shared by the commands that read sources, merge and write outputs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from loramerge.core.devices import DTYPE_CHOICES, resolve_device
from loramerge.core.report import json_text
from loramerge.errors import InvalidParameter
from loramerge.io.output import check_output, write_file
from loramerge.merge.blocks import BlockWeighting
from loramerge.merge.methods import all_params

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _apply(options: list[Decorator]) -> Decorator:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.7,-0.3"`` → ``[0.7, -0.3]``; None stays None.

    Example:
        >>> parse_weights("0.7, -0.3")
        [0.7, -0.3]
    """
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidParameter(f"--weights must be comma-separated numbers, got {text!r}") from None


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--device`` validated when the command line is parsed, before any source is read or downloaded."""
    resolve_device(value)
    return value


def check_block_weights(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """``--block-weights`` spellings checked when the command line is parsed, before any source is read."""
    BlockWeighting.parse(value)
    return value


block_weights_option = click.option(
    "--block-weights", "block_weights", multiple=True, metavar="[N:]SPEC", callback=check_block_weights,
    help="Per-block strength, as the LoRA Block Weight extension sets it: a preset (ALL, INS, IND, INALL, MIDD, "
         "OUTD, OUTS, OUTALL, ALL0.5, NONE), a vector in its block order (17 entries for SD 1.x/2.x, 12 for SDXL; "
         "26/20 for LyCORIS, 61 for Flux) or rules such as double_blocks.0-9=0.5,BASE=0. N: applies it to "
         "source N only. Repeatable.")

device_option = click.option("--device", default="auto", show_default=True, callback=check_device,
                             help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")

compute_dtype_option = click.option("--compute-dtype", type=click.Choice(["fp32", "fp64"]), default="fp32",
                                    show_default=True, help="Precision of the maths.")
report_option = click.option("--report", "report_path", type=click.Path(dir_okay=False),
                             help="Write per-module statistics as JSON.")

def check_components(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """``--component`` spellings checked when the command line is parsed."""
    source_components(value, None)
    return value


def source_components(values: tuple[str, ...] | list[str], count: int | None) -> list[str | None]:
    """``--component [N:]NAME`` spellings as one component (or None) per source; ``N`` counts from 1.

    Example:
        >>> source_components(["2:transformer_2"], 2), source_components(["transformer_2"], 2)
        ([None, 'transformer_2'], ['transformer_2', 'transformer_2'])
    """
    from loramerge.io.formats.component import DENOISERS

    shared: str | None = None
    own: dict[int, str] = {}
    for text in values:
        number, _, name = text.rpartition(":")
        if name not in DENOISERS:
            raise InvalidParameter(f"--component {text}: the denoiser components are {', '.join(DENOISERS)}",
                                   parameter="component")
        if not number:
            shared = name
        elif not number.isdigit() or int(number) < 1 or (count is not None and int(number) > count):
            raise InvalidParameter(f"--component {text}: N must be a source number from 1 to {count or 'the count'}",
                                   parameter="component")
        else:
            own[int(number) - 1] = name
    return [own.get(i, shared) for i in range(count or 0)]


component_option = click.option(
    "--component", "components", multiple=True, metavar="[N:]NAME", callback=check_components,
    help="The denoiser the adapter file is for when the file cannot say: transformer_2 for a Wan 2.2 "
         "second-expert (low-noise) LoRA. N: applies it to source N only. Repeatable.")

READ_FORMATS = ("peft", "kohya", "lycoris", "comfyui", "diffusers")
WRITE_FORMATS = ("peft", "kohya", "lycoris", "comfyui", "diffusers")

source_options = _apply([
    click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle checkpoints (read with weights_only=True)."),
    click.option("--from", "from_format", type=click.Choice(READ_FORMATS),
                 help="Read the sources in this format instead of detecting it."),
    click.option("--base", type=click.Path(exists=True),
                 help="Base checkpoint (file or folder) whose weight names resolve kohya module names."),
    component_option,
])

skip_unknown_option = click.option(
    "--skip-unknown", is_flag=True,
    help="Leave out adapter modules whose names resolve to nothing (listed), instead of stopping.")


def _method_param_options() -> list[Decorator]:
    options = []
    for p in all_params():
        default = "depends on --method, see `loramerge methods`" if p.default is None else p.default
        kwargs: dict[str, Any] = {"default": None, "help": p.help + f" [default: {default}]"}
        if p.choices:
            kwargs["type"] = click.Choice(p.choices)
        elif p.type is bool:
            options.append(click.option(f"{p.option}/--no-{p.key.replace('_', '-')}", p.key, **kwargs))
            continue
        elif p.per_source:
            # One value, or one per source like --weights; the method parses and checks each.
            kwargs["metavar"] = "X[,X…]"
        else:
            kwargs["type"] = p.type
        options.append(click.option(p.option, p.key, **kwargs))
    return options


def _rank_options(rank_help: str) -> list[Decorator]:
    return [
        click.option("--rank", "-r", type=int, help=rank_help),
        click.option("--energy", type=float, help="Keep the smallest rank holding this fraction of Σσ² per module."),
        click.option("--max-error", type=float, help="Keep the smallest rank with relative Frobenius error at most this."),
        click.option("--sv-ratio", type=float, metavar="R",
                     help="Keep every singular value σ ≥ σ_max / R (kohya resize_lora's sv_ratio)."),
        click.option("--sv-cumulative", type=float, metavar="F",
                     help="Keep the smallest rank whose Σσ reaches F·Σσ (kohya's sv_cumulative)."),
        click.option("--sv-fro", type=float, metavar="F",
                     help="Keep the smallest rank whose Frobenius norm reaches F·‖ΔW‖ (kohya's sv_fro; = --energy F²)."),
        click.option("--rank-max", type=int, help="Cap on the per-module rank under any policy."),
    ]


def rank_options(rank_help: str) -> Decorator:
    """``--rank``, ``--energy``, ``--max-error``, ``--sv-ratio``, ``--sv-cumulative``, ``--sv-fro`` and ``--rank-max``."""
    return _apply(_rank_options(rank_help))

merge_options = _apply([
    click.option("--method", "-m", default="linear", show_default=True,
                 help="Merge method; see `loramerge methods`."),
    click.option("--weights", "-w", help="Comma-separated weight per source, e.g. 0.7,0.3 (negative allowed; default 1 each)."),
    *_rank_options("Output rank per module (re-ranks with a factored SVD)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for random methods (per-module)."),
    device_option,
    compute_dtype_option,
    click.option("--ignore-base-mismatch", is_flag=True, help="Merge sources trained on different base models."),
    report_option,
    *_method_param_options(),
])

# A method's own parameters alone (``tune`` fixes the ones it does not search with them).
method_param_options = _apply(_method_param_options())

output_options = _apply([
    click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (or file, for single-file formats)."),
    click.option("--dtype", type=click.Choice(DTYPE_CHOICES), help="Stored dtype [default: the sources' dtype]."),
    click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output."),
    click.option("--format", "out_format", type=click.Choice(WRITE_FORMATS),
                 help="Output format [default: the first source's format]."),
])


def show_progress() -> bool:
    """Progress bars only on a terminal: a log file or a pipe gets the result lines alone."""
    return sys.stderr.isatty()


def check_report(report_path: str | None, force: bool) -> None:
    """Refuse a ``--report`` path that exists (without ``--force``) before any work is done."""
    if report_path:
        check_output(report_path, force=force, directory=False)


def write_report(report_path: str | None, data: Any, force: bool) -> None:
    """Write ``--report`` JSON (a report's ``to_dict()`` or a plain dict) through the output layer."""
    if report_path:
        write_file(report_path, json_text(data), force=force)


def method_params_from(options: dict[str, Any]) -> dict[str, Any]:
    """The method parameters the user actually set, keyed by their user-facing name."""
    return {p.key: options[p.key] for p in all_params() if options.get(p.key) is not None}


push_options = _apply([
    click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME",
                 help="Also upload the output to this Hub model repository (created if needed; needs HF_TOKEN or a login)."),
    click.option("--private", is_flag=True, help="Create the Hub repository as private."),
    click.option("--commit-message", help="Commit message of the push."),
])

card_options = _apply([
    click.option("--no-card", is_flag=True, help="Do not write README.md and loramerge_recipe.yaml into the output folder."),
])

runtime_options = _apply([
    click.option("--device", default="auto", show_default=True, help="Where the model runs: auto, cpu or cuda[:N]."),
    click.option("--dtype", "model_dtype", type=click.Choice(DTYPE_CHOICES),
                 help="Load the model in this dtype [default: the checkpoint's own]."),
    click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Sequences per forward pass."),
    click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin model weights (read with weights_only=True)."),
])

data_options = _apply([
    click.option("--model", help="Base model folder or Hub id, for data-aware methods (regmean).",),
    click.option("--data", multiple=True,
                 help="Data-aware methods: one JSONL data file per source, in the sources' order (or NAME=FILE)."),
    click.option("--stats", type=click.Path(file_okay=False),
                 help="Folder caching the collected statistics, so a second merge does not run the model."),
    click.option("--limit", type=click.IntRange(min=1), help="Use the first N rows of each --data file."),
])
