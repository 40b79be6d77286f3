"""What ``combine`` and ``resize`` do with a merged adapter: write it with its card and recipe, report, push."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from loramerge.cli.options import write_report
from loramerge.core.adapter import Adapter
from loramerge.hub.publish import add_data_to_recipe, publish_merge, recipe_from_report


def publish_merged(merged: Adapter, output: str, *, out_format: str | None, dtype: str | None, force: bool,
                   card: bool, compute_dtype: str, report_path: str | None, push_to_hub: str | None,
                   private: bool, commit_message: str | None, ignore_base_mismatch: bool = False,
                   allow_pickle: bool = False, model: str | None = None, data: Sequence[str] = ()) -> None:
    """Write ``merged`` to ``output`` (model card and recipe beside it), its report, and push when asked.

    ``model`` and ``data`` (a data-aware merge's) are written into the recipe."""
    recipe = recipe_from_report(
        merged, Path(output), compute_dtype=compute_dtype if compute_dtype != "fp32" else None,
        ignore_base_mismatch=ignore_base_mismatch, allow_pickle=allow_pickle,
        output={k: v for k, v in (("dtype", dtype), ("format", out_format)) if v} or None,
    )
    if recipe is not None and model is not None and data:
        add_data_to_recipe(recipe, model, data, Path(output))
    pushed = publish_merge(merged, output, format=out_format, dtype=dtype, force=force, card=card,
                           recipe=recipe, repo_id=push_to_hub, private=private, commit_message=commit_message)
    report = merged.report
    assert report is not None
    write_report(report_path, report.to_dict(), force)
    click.echo(report.summary())
    click.echo(f"wrote {output} ({report.method}, {len(merged)} modules, {report.seconds:.2f}s)")
    if pushed is not None:
        click.echo(f"pushed to {pushed.repo_id} (commit {pushed.commit}): {pushed.url}")
