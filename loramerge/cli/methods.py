"""``loramerge methods``: the registered methods with their formulas, parameters and defaults."""

from __future__ import annotations

import click

from loramerge.merge.methods import available_methods


@click.command()
@click.option("--verbose", "-v", is_flag=True, help="Also show each method's formula and paper.")
def methods(verbose: bool) -> None:
    """List the merge methods, their parameters and defaults.

    \b
    Examples:
      loramerge methods
      loramerge methods -v
    """
    for m in available_methods():
        params = ", ".join(f"{p.option} {p.default}" for p in m.params) or "-"
        rank = {"exact": "exact", "max_source_rank": "max source rank"}[m.default_rank]
        if not m.accepts_rank:
            rank = "Σ rᵢ (fixed)"
        click.echo(f"{m.name:<16} {m.summary}")
        sources = ""
        if m.max_sources is not None:
            sources = f"; sources: exactly {m.max_sources}" if m.max_sources == m.min_sources else f"; sources: ≤ {m.max_sources}"
        click.echo(f"{'':<16} params: {params}; default rank: {rank}{sources}")
        if verbose:
            click.echo(f"{'':<16} formula: {m.formula}")
            click.echo(f"{'':<16} paper: {m.paper}")
