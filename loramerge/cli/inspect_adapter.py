"""``loramerge inspect``: what an adapter holds."""

from __future__ import annotations

import json
import math

import click

from loramerge.cli.options import skip_unknown_option, source_components, source_options
from loramerge.core.adapter import Adapter
from loramerge.core.devices import dtype_name
from loramerge.fold.coverage import coverage
from loramerge.io.sources import load


def describe(adapter: Adapter) -> dict:
    """A JSON-ready description: format, base model, dtype, counts and one row per module.

    Example:
        >>> import torch
        >>> from loramerge import LowRank
        >>> describe(Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.5)}))["modules"][0]["rank"]
        2
    """
    flattened = set(adapter.config.get("flattened") or ())  # LyCORIS conv kernels nothing here knows
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
        "skipped": list(adapter.config.get("skipped") or []),
        "modules": [
            {
                "module": name,
                "kind": lr.kind,
                "rank": lr.rank,
                "alpha": lr.alpha if lr.alpha is not None else lr.scale * lr.rank,
                "scale": lr.scale,
                "shape": list(lr.base_shape),
                "dora": lr.magnitude is not None,
                "kernel_unknown": name in flattened,
            }
            for name, lr in adapter.layers.items()
        ],
    }


@click.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@source_options
@skip_unknown_option
def inspect(source: str, as_json: bool, allow_pickle: bool, from_format: str | None, base: str | None,
            components: tuple[str, ...], skip_unknown: bool) -> None:
    """Show an adapter's format, base model, modules, ranks, alphas, scales, size and dtype.

    With --base MODEL it also shows which base weight each module reaches, the modules that
    reach none, and the base weights of the adapted kinds that no module reaches. A module
    whose name resolves to nothing is an error naming it and the nearest base names;
    --skip-unknown leaves such modules out and lists them.

    \b
    Examples:
      loramerge inspect ./my-adapter
      loramerge inspect ./my-adapter --json | jq '.modules[0]'
      loramerge inspect wan_lora.safetensors --base ./Wan2.1-T2V-14B-Diffusers/transformer
    """
    adapter = load(source, format=from_format, allow_pickle=allow_pickle, base=base, skip_unknown=skip_unknown,
                   component=source_components(components, 1)[0])
    info = describe(adapter)
    if base is not None:
        info["coverage"] = coverage(adapter, base)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("source", "format", "architecture", "base_model", "task_type", "dtype", "module_count",
                "parameter_count"):
        click.echo(f"{key + ':':<17}{info[key]}")
    if info["full_weights"]:
        click.echo(f"{'full weights:':<17}{', '.join(info['full_weights'])}")
    if info["skipped"]:
        click.echo(f"{'skipped:':<17}{len(info['skipped'])} unknown module(s): {', '.join(info['skipped'])}")
    width = max(len(m["module"]) for m in info["modules"])
    click.echo(f"\n{'module':<{width}}  {'kind':<9} {'rank':>4} {'alpha':>8} {'scale':>8}  shape")
    for m in info["modules"]:
        alpha = f"{m['alpha']:g}" if math.isfinite(m["alpha"]) else "-"
        dora = ("  (DoRA)" if m["dora"] else "") + \
            ("  (LyCORIS stores it flattened: a conv's kernel needs --base)" if m["kernel_unknown"] else "")
        click.echo(
            f"{m['module']:<{width}}  {m['kind']:<9} {m['rank']:>4} {alpha:>8} {m['scale']:>8.4g}  "
            f"{'x'.join(map(str, m['shape']))}{dora}"
        )
    if "coverage" in info:
        _print_coverage(info["coverage"])


def _print_coverage(found: dict) -> None:
    click.echo(f"\nbase coverage: {len(found['matched'])} matched, {len(found['unmatched'])} unmatched, "
               f"{len(found['untouched'])} untouched weight(s) of the adapted kinds")
    for module, tensors in found["matched"].items():
        click.echo(f"  {module} -> {', '.join(tensors)}")
    for module, near in found["unmatched"].items():
        click.echo(f"  unmatched: {module}" + (f" (nearest: {', '.join(near)})" if near else ""))
    for tensor in found["untouched"]:
        click.echo(f"  untouched: {tensor}")
