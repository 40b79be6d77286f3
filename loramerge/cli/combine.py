"""``loramerge combine``: merge several adapters into one."""

from __future__ import annotations

from typing import Any

import click

from loramerge.cli.options import (
    block_weights_option,
    card_options,
    check_report,
    data_options,
    merge_options,
    method_params_from,
    output_options,
    parse_weights,
    push_options,
    show_progress,
    source_components,
    source_options,
)
from loramerge.cli.output import publish_merged
from loramerge.io.hub import check_push
from loramerge.io.output import check_output
from loramerge.io.sources import load
from loramerge.runtime.merging import merge


@click.command()
@click.argument("sources", nargs=-1, required=True)
@output_options
@merge_options
@block_weights_option
@source_options
@data_options
@push_options
@card_options
def combine(sources: tuple[str, ...], output: str, dtype: str | None, force: bool, out_format: str | None,
            method: str, weights: str | None, rank: int | None, energy: float | None, max_error: float | None,
            sv_ratio: float | None, sv_cumulative: float | None, sv_fro: float | None,
            rank_max: int | None, seed: int, device: str, compute_dtype: str, ignore_base_mismatch: bool,
            report_path: str | None, block_weights: tuple[str, ...], allow_pickle: bool, from_format: str | None,
            base: str | None, components: tuple[str, ...], push_to_hub: str | None, private: bool, commit_message: str | None, no_card: bool,
            model: str | None, data: tuple[str, ...], stats: str | None, limit: int | None,
            **method_options: Any) -> None:
    """Merge SOURCE adapters into one adapter written to -o OUTPUT.

    A SOURCE is a local file or folder, or a Hub id: org/name, org/name@revision,
    org/name/subfolder. Without --rank, `linear` stores the exact weighted sum as a concatenation
    (rank = Σ rᵢ); `svd` re-ranks that sum with a factored SVD (default: the largest source rank).
    The output folder also gets a model card (README.md) and loramerge_recipe.yaml.

    \b
    Examples:
      loramerge combine ./math ./code -o merged --weights 0.7,0.3
      loramerge combine ./math ./code -o merged --method svd --rank 16
      loramerge combine ./a ./b ./c -o merged --method svd --energy 0.99 --rank-max 64
      loramerge combine ./a ./b -o diff --weights 1,-1 --dtype bf16 --force
      loramerge combine org/math-lora@v2 ./code -o merged --push-to-hub me/math-code --private
      loramerge combine style.safetensors detail.safetensors -o merged.safetensors --method svd --rank 32
      loramerge combine kohya.safetensors ./diffusers-lora -o merged --format diffusers
      loramerge combine high.safetensors low.safetensors --component 2:transformer_2 -o wan22-both --format peft
      loramerge combine ./math ./code -m regmean --model ./llama --data math.jsonl --data code.jsonl -o merged
      loramerge combine a.safetensors b.safetensors -o m.safetensors --block-weights OUTALL --block-weights 2:INS
      loramerge combine a.safetensors b.safetensors -o m.safetensors --method svd --sv-ratio 8 --rank-max 64
    """
    check_output(output, force=force)
    check_report(report_path, force)
    if push_to_hub:
        check_push(push_to_hub)
    adapters = [load(s, format=from_format, allow_pickle=allow_pickle, base=base, component=component)
                for s, component in zip(sources, source_components(components, len(sources)))]
    merged = merge(
        adapters, method=method, weights=parse_weights(weights), rank=rank, energy=energy, max_error=max_error,
        sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, sv_fro=sv_fro, rank_max=rank_max, seed=seed, device=device,
        dtype=dtype, compute_dtype=compute_dtype, ignore_base_mismatch=ignore_base_mismatch, progress=show_progress(),
        block_weights=block_weights, model=model, data=list(data), stats=stats, limit=limit, allow_pickle=allow_pickle,
        **method_params_from(method_options),
    )
    publish_merged(merged, output, out_format=out_format, dtype=dtype, force=force, card=not no_card,
                   compute_dtype=compute_dtype, report_path=report_path, push_to_hub=push_to_hub, private=private,
                   commit_message=commit_message, ignore_base_mismatch=ignore_base_mismatch, allow_pickle=allow_pickle,
                   model=model, data=data)
