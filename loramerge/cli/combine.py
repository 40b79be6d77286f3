"""``loramerge combine``: merge several adapters into one."""

from __future__ import annotations

from typing import Any

import click

from loramerge.cli.options import (
    merge_options,
    method_params_from,
    output_options,
    parse_weights,
    source_options,
)
from loramerge.merge import merge
from loramerge.output import check_output
from loramerge.sources import load


@click.command()
@click.argument("sources", nargs=-1, required=True)
@output_options
@merge_options
@source_options
def combine(sources: tuple[str, ...], output: str, dtype: str | None, force: bool, method: str, weights: str | None,
            rank: int | None, energy: float | None, max_error: float | None, rank_max: int | None, seed: int,
            device: str, compute_dtype: str, ignore_base_mismatch: bool, report_path: str | None,
            allow_pickle: bool, **method_options: Any) -> None:
    """Merge SOURCE adapters into one adapter written to -o OUTPUT.

    Without --rank, `linear` stores the exact weighted sum as a concatenation (rank = Σ rᵢ);
    `svd` re-ranks that sum with a factored SVD (default: the largest source rank).

    \b
    Examples:
      loramerge combine ./math ./code -o merged --weights 0.7,0.3
      loramerge combine ./math ./code -o merged --method svd --rank 16
      loramerge combine ./a ./b ./c -o merged --method svd --energy 0.99 --rank-max 64
      loramerge combine ./a ./b -o diff --weights 1,-1 --dtype bf16 --force
    """
    check_output(output, force=force)
    adapters = [load(s, allow_pickle=allow_pickle) for s in sources]
    merged = merge(
        adapters, method=method, weights=parse_weights(weights), rank=rank, energy=energy, max_error=max_error,
        rank_max=rank_max, seed=seed, device=device, dtype=dtype, compute_dtype=compute_dtype,
        ignore_base_mismatch=ignore_base_mismatch, progress=True, **method_params_from(method_options),
    )
    path = merged.save(output, dtype=dtype, force=force)
    report = merged.report
    assert report is not None
    if report_path:
        report.write_json(report_path)
    click.echo(report.summary())
    click.echo(f"wrote {path} ({report.method}, {len(merged)} modules, {report.seconds:.2f}s)")
