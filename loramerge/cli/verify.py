"""``loramerge verify``: check a merged adapter or a folded model against the unmerged adapters."""

from __future__ import annotations

import click

from loramerge.cli.options import parse_weights, runtime_options
from loramerge.errors import VerificationFailed
from loramerge.runtime.verify import verify as run_verify


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", "-w", help="Comma-separated weight per adapter (default 1 each), as given to the merge.")
@click.option("--merged", help="The merged adapter to check.")
@click.option("--folded", help="The folded model folder to check.")
@click.option("--prompts", type=click.Path(dir_okay=False),
              help="Inputs: a JSONL file of evaluation rows, or plain text with one prompt per line "
                   "[default: seeded random token sequences].")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most this many prompts.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Random sequences when no --prompts.")
@click.option("--length", type=click.IntRange(min=2), default=32, show_default=True,
              help="Tokens per random sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sequences.")
@click.option("--tolerance", type=float,
              help="Largest max relative logit error that passes [default: measured: 4× the error of the exact "
                   "result rounded to the stored dtype, at least 1e-5 (fp32), 1e-3 (fp16), 8e-3 (bf16)].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Print the module count instead of the coverage table.")
@click.option("--no-locate", is_flag=True, help="On failure, do not search for the module responsible.")
@runtime_options
def verify(base: str, adapters: tuple[str, ...], weights: str | None, merged: str | None, folded: str | None,
           prompts: str | None, limit: int | None, samples: int, length: int, seed: int, tolerance: float | None,
           json_path: str | None, quiet: bool, no_locate: bool, device: str, model_dtype: str | None,
           batch_size: int, allow_pickle: bool) -> None:
    """Check that --merged ADAPTER or --folded MODEL does what the unmerged ADAPTERS do on BASE.

    Every adapter module is matched to a base weight (an unmatched one is an error) and the base
    modules of the same kinds that no adapter touches are listed. Then the base model runs with
    the adapters' weighted sum applied unmerged, and with the merged adapter (or as the folded
    model), on the same inputs; it reports the max relative logit error, the mean KL divergence
    and the top-1 agreement, overall and for the worst input. Exit status 0 within --tolerance,
    1 otherwise, naming the worst input and the module that causes the difference.
    An exact merge (linear, cat) or a fold shows rounding only; a lossy one (svd --rank, ties)
    shows its gap. Needs the eval extra: pip install "loramerge[eval]".

    \b
    Examples:
      loramerge verify ./llama ./math ./code --weights 0.7,0.3 --merged ./merged
      loramerge verify ./llama ./math --folded ./llama-math --prompts prompts.jsonl
      loramerge verify ./llama ./a ./b --merged ./ties-merge --tolerance 0.05 --json gap.json -q
    """
    result = run_verify(base, list(adapters), weights=parse_weights(weights), merged=merged, folded=folded,
                        prompts=prompts, limit=limit, samples=samples, length=length, seed=seed, tolerance=tolerance,
                        batch_size=batch_size, device=device, dtype=model_dtype, locate=not no_locate,
                        allow_pickle=allow_pickle, progress=True)
    click.echo(result.coverage.summary() if quiet else result.coverage.table() + "\n" + result.coverage.summary())
    click.echo(result.summary())
    if json_path:
        result.write_json(json_path)
    if not result.passed:
        raise VerificationFailed(result.failure())
