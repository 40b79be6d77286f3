"""``loramerge fold``: fold adapters into a base model's weights, shard by shard."""

from __future__ import annotations

from typing import Any

import click

from loramerge.cli.options import (
    block_weights_option,
    check_report,
    component_option,
    merge_options,
    method_params_from,
    parse_weights,
    push_options,
    show_progress,
    skip_unknown_option,
    source_components,
    write_report,
)
from loramerge.fold.engine import fold as run_fold
from loramerge.fold.plan import TIED_MODES
from loramerge.hub.publish import push_fold
from loramerge.io.hub import check_push
from loramerge.io.output import check_output
from loramerge.io.quant.view import BaseQuant
from loramerge.io.sources import load


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(),
              help="Output model folder; a .safetensors file when BASE is a single-file checkpoint.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True,
              help="Stored dtype of the floating tensors.")
@click.option("--shard-size", help="Re-shard to at most this size per file, e.g. 5GB or 2GiB [default: keep the base's shards].")
@click.option("--tied-embeddings", type=click.Choice(TIED_MODES), default="refuse", show_default=True,
              help="When an adapter changes one of two tied embeddings: refuse, untie (write both, "
                   "tie_word_embeddings false) or shared (fold into the shared matrix, as PEFT does).")
@click.option("--follow-symlinks", is_flag=True,
              help="Copy what symbolic links in the base folder point to even outside it (never /proc, FIFOs, devices).")
@click.option("--strict", is_flag=True, help="Refuse adapters trained on a different base model (default: warn).")
@click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output.")
@merge_options
@block_weights_option
@click.option("--allow-pickle", is_flag=True,
              help="Allow pickle .bin weights (read with torch.load(weights_only=True)).")
@click.option("--base-quant", type=click.Choice(["nf4", "fp4"]),
              help="Fold into dequant(quant(W)), the 4-bit weights a QLoRA adapter was trained against, for every "
                   "weight transformers quantizes (bitsandbytes, bit for bit); writes --dtype (bf16 unless given).")
@click.option("--blocksize", type=int, default=64, show_default=True, help="4-bit quantization block size.")
@click.option("--double-quant/--no-double-quant", default=False, show_default=True,
              help="Double quantization of the 4-bit scales (bnb_4bit_use_double_quant).")
@click.option("--quant-skip-modules", help="Comma-separated modules kept in full precision (llm_int8_skip_modules; "
                                           "replaces transformers' default, lm_head).")
@click.option("--keep-quant", is_flag=True,
              help="Write a pre-quantized base's folded weights quantized again the same way (bitsandbytes, FP8).")
@click.option("--quantize", type=click.Choice(["nf4", "fp4"]),
              help="Write a pre-quantized bitsandbytes 4-bit checkpoint that transformers loads as such.")
@skip_unknown_option
@component_option
@push_options
def fold(base: str, adapters: tuple[str, ...], output: str, dtype: str, shard_size: str | None, tied_embeddings: str,
         follow_symlinks: bool, strict: bool, force: bool, method: str, weights: str | None, rank: int | None, energy: float | None,
         max_error: float | None, sv_ratio: float | None, sv_cumulative: float | None, sv_fro: float | None,
         rank_max: int | None, seed: int, device: str, compute_dtype: str, ignore_base_mismatch: bool,
         report_path: str | None, block_weights: tuple[str, ...], allow_pickle: bool, base_quant: str | None,
         blocksize: int, double_quant: bool, quant_skip_modules: str | None, keep_quant: bool, quantize: str | None,
         skip_unknown: bool, components: tuple[str, ...], push_to_hub: str | None, private: bool, commit_message: str | None,
         **method_options: Any) -> None:
    """Fold ADAPTERS into the model at BASE and write the full model to -o OUTPUT.

    BASE is a model folder, a diffusers pipeline folder (model_index.json) or a single-file
    SD/SDXL/Flux .safetensors checkpoint, which is written as one file with its original key names
    (q/k/v of fused weights go into their rows). Adapters may be PEFT, kohya, LyCORIS or diffusers.
    A quantized BASE (bitsandbytes 4/8-bit, FP8 block-scaled, GPTQ, AWQ) is dequantized on the fly
    and written in full precision (--keep-quant: quantized again). --base-quant folds a QLoRA
    adapter into the 4-bit weights it was trained against.
    Tensor names, shards and dtypes stay as they are; config, tokenizer and other files are
    copied; loramerge.json (a single file: its "loramerge" metadata) records the recipe. The maths
    runs in float32 and is rounded once.
    One adapter with --weights w folds w·ΔW (negative subtracts); several adapters are merged
    with --method and the rank options of `combine`.

    \b
    Examples:
      loramerge fold ./llama ./math-adapter -o llama-math
      loramerge fold ./llama ./math ./code -o llama-mc --weights 0.7,0.3
      loramerge fold ./llama ./math ./code -o llama-mc --method svd --rank 16 --dtype bf16
      loramerge fold ./llama-math ./math-adapter -o llama --weights -1 --force
      loramerge fold ./gemma ./embed-adapter -o out --tied-embeddings untie --shard-size 2GB
      loramerge fold org/llama org/math-lora -o llama-math --push-to-hub me/llama-math
      loramerge fold sdxl.safetensors style.safetensors -o sdxl-style.safetensors
      loramerge fold ./sdxl-pipeline style.safetensors detail.safetensors -o sdxl-sd --weights 0.8,0.5
      loramerge fold ./llama ./qlora-adapter -o llama-qlora --base-quant nf4 --double-quant
      loramerge fold ./llama-bnb-4bit ./qlora-adapter -o llama-4bit-merged --keep-quant
      loramerge fold sdxl.safetensors style.safetensors -o out.safetensors --block-weights OUTALL
      loramerge fold flux1-dev.safetensors lora.safetensors -o out.safetensors --block-weights 'single_blocks.20-37=0'
      loramerge fold ./Wan2.2-T2V-A14B-Diffusers high.safetensors low.safetensors --component 2:transformer_2 -o out
    """
    check_output(output, force=force)
    check_report(report_path, force)
    if push_to_hub:
        check_push(push_to_hub)
    # Loaded here when pushing, so the card and recipe know the commit each Hub source resolved to.
    # With --skip-unknown, loaded here so that what was left out is listed; with --component, to say the denoiser.
    loaded = push_to_hub or skip_unknown or components
    named = source_components(components, len(adapters))
    sources = [load(a, allow_pickle=allow_pickle, skip_unknown=skip_unknown, component=c)
               for a, c in zip(adapters, named)] if loaded else list(adapters)
    for adapter in sources if loaded else ():
        skipped = adapter.config.get("skipped") or []
        if skipped:
            click.echo(f"skipped {len(skipped)} unknown module(s) of {adapter.source}: {', '.join(skipped)}", err=True)
    skip = [m.strip() for m in quant_skip_modules.split(",") if m.strip()] if quant_skip_modules else None
    spec = BaseQuant(base_quant, blocksize, double_quant, skip) if base_quant else None
    result = run_fold(
        base, sources, output=output, weights=parse_weights(weights), method=method, rank=rank,
        energy=energy, max_error=max_error, sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, sv_fro=sv_fro,
        rank_max=rank_max, seed=seed, dtype=dtype, shard_size=shard_size, block_weights=block_weights,
        device=device, compute_dtype=compute_dtype, tied_embeddings_mode=tied_embeddings, force=force,
        strict=strict, allow_pickle=allow_pickle, ignore_base_mismatch=ignore_base_mismatch, progress=show_progress(),
        base_quant=spec, keep_quant=keep_quant, quantize=quantize, double_quant=double_quant,
        follow_symlinks=follow_symlinks,
        **method_params_from(method_options),
    )
    if result.merge_report is not None:
        click.echo(result.merge_report.summary())
    write_report(report_path, result.merge_report.to_dict() if result.merge_report is not None else result.recipe, force)
    for note in result.recipe.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(result.summary())
    if push_to_hub:
        pushed = push_fold(result, push_to_hub, adapters=sources, private=private, commit_message=commit_message,
                           compute_dtype=compute_dtype if compute_dtype != "fp32" else None,
                           ignore_base_mismatch=ignore_base_mismatch, allow_pickle=allow_pickle)
        click.echo(f"pushed to {pushed.repo_id} (commit {pushed.commit}): {pushed.url}")
