"""``loramerge resize``: re-rank one LoRA (any format) with the factored SVD and a rank policy."""

from __future__ import annotations

import click

from loramerge.cli.options import (
    block_weights_option,
    card_options,
    compute_dtype_option,
    device_option,
    output_options,
    push_options,
    rank_options,
    report_option,
    source_components,
    source_options,
)
from loramerge.cli.output import publish_merged
from loramerge.io.hub import check_push
from loramerge.io.output import check_output
from loramerge.io.sources import load
from loramerge.merge.resize import resize as run_resize


@click.command()
@click.argument("adapter")
@output_options
@rank_options("Output rank of every module (a module of lower rank keeps its own).")
@device_option
@compute_dtype_option
@report_option
@block_weights_option
@source_options
@push_options
@card_options
def resize(adapter: str, output: str, dtype: str | None, force: bool, out_format: str | None, rank: int | None,
           energy: float | None, max_error: float | None, sv_ratio: float | None, sv_cumulative: float | None,
           sv_fro: float | None, rank_max: int | None, device: str, compute_dtype: str, report_path: str | None,
           block_weights: tuple[str, ...], allow_pickle: bool, from_format: str | None, base: str | None,
           components: tuple[str, ...], push_to_hub: str | None, private: bool, commit_message: str | None, no_card: bool) -> None:
    """Re-rank the LoRA ADAPTER and write it to -o OUTPUT.

    Every module is decomposed from its factors (QR, then an SVD of the small rank×rank core),
    never as the dense out×in matrix, and truncated by the rank policy: a fixed --rank, --energy,
    --max-error, or kohya resize_lora.py's dynamic methods --sv-ratio, --sv-cumulative and
    --sv-fro (--sv-fro F is --energy F²), capped by --rank-max. kohya keeps one direction more than
    its criterion asks; loramerge keeps the smallest rank that meets it. LyCORIS LoHa/LoKr inputs
    are resized into a plain LoRA. The summary (and --report) gives each module's rank before and
    after, the energy kept and the relative error.

    \b
    Examples:
      loramerge resize style.safetensors -o style-r16.safetensors --rank 16
      loramerge resize style.safetensors -o style-dyn.safetensors --sv-fro 0.9 --rank-max 64
      loramerge resize style.safetensors -o style-dyn.safetensors --sv-ratio 8 --report ranks.json
      loramerge resize loha.safetensors -o locon.safetensors --sv-cumulative 0.95 --format kohya
      loramerge resize ./peft-adapter -o small --max-error 0.05
    """
    check_output(output, force=force)
    if push_to_hub:
        check_push(push_to_hub)
    source = load(adapter, format=from_format, allow_pickle=allow_pickle, base=base,
                  component=source_components(components, 1)[0])
    resized = run_resize(source, rank=rank, energy=energy, max_error=max_error, sv_ratio=sv_ratio,
                         sv_cumulative=sv_cumulative, sv_fro=sv_fro, rank_max=rank_max, device=device, dtype=dtype,
                         compute_dtype=compute_dtype, block_weights=block_weights, progress=True)
    before = sum(lr.rank for lr in source.layers.values())
    after = sum(lr.rank for lr in resized.layers.values())
    publish_merged(resized, output, out_format=out_format, dtype=dtype, force=force, card=not no_card,
                   compute_dtype=compute_dtype, report_path=report_path, push_to_hub=push_to_hub, private=private,
                   commit_message=commit_message, allow_pickle=allow_pickle)
    click.echo(f"total rank {before} -> {after}; {source.parameter_count():,} -> {resized.parameter_count():,} "
               "factor entries")
