"""``loramerge inspect``: what an adapter holds."""

from __future__ import annotations

import json
import math

import click

from loramerge.cli.options import source_options
from loramerge.core.adapter import Adapter
from loramerge.core.devices import dtype_name
from loramerge.io.sources import load


def describe(adapter: Adapter) -> dict:
    """A JSON-ready description: format, base model, dtype, counts and one row per module.

    Example:
        >>> import torch
        >>> from loramerge import LowRank
        >>> describe(Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.5)}))["modules"][0]["rank"]
        2
    """
    return {
        "source": adapter.source,
        "format": adapter.source_format,
        "architecture": "/".join(adapter.config.get("architectures") or []) or None,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "dtype": dtype_name(adapter.dtype),
        "module_count": len(adapter),
        "parameter_count": adapter.parameter_count(),
        "full_weights": sorted(adapter.full_weights),
        "modules": [
            {
                "module": name,
                "kind": lr.kind,
                "rank": lr.rank,
                "alpha": lr.alpha if lr.alpha is not None else lr.scale * lr.rank,
                "scale": lr.scale,
                "shape": list(lr.base_shape),
                "dora": lr.magnitude is not None,
            }
            for name, lr in adapter.layers.items()
        ],
    }


@click.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@source_options
def inspect(source: str, as_json: bool, allow_pickle: bool, from_format: str | None, base: str | None) -> None:
    """Show an adapter's format, base model, modules, ranks, alphas, scales, size and dtype.

    \b
    Examples:
      loramerge inspect ./my-adapter
      loramerge inspect ./my-adapter --json | jq '.modules[0]'
    """
    info = describe(load(source, format=from_format, allow_pickle=allow_pickle, base=base))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("source", "format", "architecture", "base_model", "task_type", "dtype", "module_count",
                "parameter_count"):
        click.echo(f"{key + ':':<17}{info[key]}")
    if info["full_weights"]:
        click.echo(f"{'full weights:':<17}{', '.join(info['full_weights'])}")
    width = max(len(m["module"]) for m in info["modules"])
    click.echo(f"\n{'module':<{width}}  {'kind':<9} {'rank':>4} {'alpha':>8} {'scale':>8}  shape")
    for m in info["modules"]:
        alpha = f"{m['alpha']:g}" if math.isfinite(m["alpha"]) else "-"
        dora = "  (DoRA)" if m["dora"] else ""
        click.echo(
            f"{m['module']:<{width}}  {m['kind']:<9} {m['rank']:>4} {alpha:>8} {m['scale']:>8.4g}  "
            f"{'x'.join(map(str, m['shape']))}{dora}"
        )
