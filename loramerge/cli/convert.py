"""``loramerge convert``: rewrite an adapter in another format."""

from __future__ import annotations

import click

from loramerge.cli.options import (
    WRITE_FORMATS,
    block_weights_option,
    push_options,
    skip_unknown_option,
    source_components,
    source_options,
)
from loramerge.convert import convert as run
from loramerge.core.devices import DTYPE_CHOICES
from loramerge.hub.cards import converted_card
from loramerge.hub.publish import publish_output
from loramerge.io.experts import EXPERT_LAYOUTS
from loramerge.io.hub import check_push
from loramerge.io.output import check_output
from loramerge.io.sources import load


@click.command()
@click.argument("source")
@click.option("--output", "-o", required=True, type=click.Path(),
              help="Output file (kohya, lycoris, comfyui) or folder (peft, diffusers).")
@click.option("--to", "to", type=click.Choice(WRITE_FORMATS), help="Output format [default: the source's format].")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), help="Stored dtype [default: the source's dtype].")
@click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output.")
@click.option("--experts", type=click.Choice(["split", "fuse"]),
              help="MoE: split fused expert LoRAs (PEFT target_parameters) into per-expert modules, or fuse them.")
@click.option("--expert-layout", type=click.Choice(list(EXPERT_LAYOUTS)), default="qwen2_moe", show_default=True,
              help="Per-expert module names: qwen2_moe (experts.N.gate_proj/up_proj/down_proj) or mixtral "
                   "(block_sparse_moe.experts.N.w1/w3/w2).")
@block_weights_option
@source_options
@skip_unknown_option
@push_options
def convert(source: str, output: str, to: str | None, dtype: str | None, force: bool, experts: str | None,
            expert_layout: str, block_weights: tuple[str, ...], allow_pickle: bool, from_format: str | None,
            base: str | None, components: tuple[str, ...], skip_unknown: bool, push_to_hub: str | None, private: bool,
            commit_message: str | None) -> None:
    """Rewrite the SOURCE adapter in another format; every module's update stays the same
    (times its block weight, with --block-weights).

    \b
    Examples:
      loramerge convert lora.safetensors -o lora-diffusers --to diffusers
      loramerge convert ./diffusers-lora -o lora.safetensors --to kohya
      loramerge convert loha.safetensors -o locon.safetensors --to kohya     # exact B@A expansion
      loramerge convert loha.safetensors -o same.safetensors                 # stays a LoHa (LyCORIS)
      loramerge convert wan_comfy.safetensors -o wan-diffusers --to diffusers
      loramerge convert wan22_low.safetensors -o low-diffusers --to diffusers --component transformer_2
      loramerge convert qwen_lora -o qwen.safetensors --to comfyui           # diffusion_model.<original>
      loramerge convert lora.safetensors -o peft-dir --to peft --dtype bf16
      loramerge convert org/sd-loras/pixel.safetensors -o pixel --to diffusers --push-to-hub me/pixel
      loramerge convert ./qwen3-moe-lora -o per-expert --experts split          # target_parameters → modules
      loramerge convert ./mixtral-lora -o fused --experts fuse --expert-layout mixtral
      loramerge convert style.safetensors -o style-outs.safetensors --block-weights OUTS
    """
    check_output(output, force=force)
    if push_to_hub:
        check_push(push_to_hub)
    adapter = load(source, format=from_format, allow_pickle=allow_pickle, base=base, skip_unknown=skip_unknown,
                   component=source_components(components, 1)[0])
    skipped = adapter.config.get("skipped") or []
    if skipped:
        click.echo(f"skipped {len(skipped)} unknown module(s): {', '.join(skipped)}", err=True)
    path = run(adapter, output, to=to, dtype=dtype, force=force, experts=experts, expert_layout=expert_layout,
               block_weights=block_weights)
    click.echo(f"wrote {path}")
    if push_to_hub:
        card = converted_card(adapter, format_name=to or adapter.source_format, repo_id=push_to_hub)
        pushed = publish_output(path, push_to_hub, private=private, commit_message=commit_message, card=card)
        click.echo(f"pushed to {pushed.repo_id} (commit {pushed.commit}): {pushed.url}")
