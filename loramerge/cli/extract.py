"""``loramerge extract``: a LoRA adapter from the difference between a fine-tuned model and its base."""

from __future__ import annotations

import click

from loramerge.cli.options import (
    check_report,
    device_option,
    push_options,
    rank_options,
    show_progress,
    write_report,
)
from loramerge.core.devices import DTYPE_CHOICES
from loramerge.extract import DEFAULT_RANK, EXACT_LIMIT
from loramerge.extract import extract as run_extract
from loramerge.hub.publish import publish_output
from loramerge.io.hub import check_push
from loramerge.io.output import check_output


@click.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output PEFT adapter folder.")
@rank_options(f"Rank per module [default: {DEFAULT_RANK} when no other policy is given].")
@click.option("--modules", help="Only modules whose path matches this regex (re.search), e.g. 'self_attn|mlp'.")
@click.option("--keep-full", is_flag=True, help="Keep changed embeddings, norms and other tensors as modules_to_save.")
@click.option("--exact-limit", type=int, default=EXACT_LIMIT, show_default=True,
              help="Exact SVD when the smaller side is at most this; randomized (error measured) above it.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="fp32", show_default=True, help="Stored factor dtype.")
@device_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the full report as JSON here.")
@click.option("--force", is_flag=True, help="Overwrite an existing, non-empty output.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow pickle .bin weights (read with torch.load(weights_only=True)).")
@push_options
def extract(base: str, finetuned: str, output: str, rank: int | None, energy: float | None, max_error: float | None,
            sv_ratio: float | None, sv_cumulative: float | None, sv_fro: float | None, rank_max: int | None,
            modules: str | None, keep_full: bool, exact_limit: int, dtype: str, device: str,
            report_path: str | None, force: bool, allow_pickle: bool, push_to_hub: str | None, private: bool,
            commit_message: str | None) -> None:
    """Extract a PEFT LoRA adapter of FINETUNED − BASE into -o OUTPUT.

    Each changed linear/conv weight is factored by an SVD (exact when cheap, randomized with a
    measured error otherwise) at the rank the policy gives. The report shows, per module, the
    rank, energy kept and error, and the intrinsic rank of the whole fine-tune: what share of
    the update a LoRA of rank r would capture.

    \b
    Examples:
      loramerge extract ./llama ./llama-sft -o sft-lora --rank 64
      loramerge extract ./llama ./llama-sft -o sft-lora --energy 0.9 --rank-max 256
      loramerge extract ./llama ./llama-sft -o sft-lora --max-error 0.1 --modules 'self_attn' --keep-full
      loramerge extract org/llama org/llama-sft -o sft-lora --rank 64 --push-to-hub me/llama-sft-lora
    """
    check_output(output, force=force)
    check_report(report_path, force)
    if push_to_hub:
        check_push(push_to_hub)
    result = run_extract(
        base, finetuned, output=output, rank=rank, energy=energy, max_error=max_error, sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative, sv_fro=sv_fro, rank_max=rank_max,
        modules=modules, keep_full=keep_full, exact_limit=exact_limit, dtype=dtype, device=device, force=force,
        allow_pickle=allow_pickle, progress=show_progress(),
    )
    write_report(report_path, result.report.to_dict(), force)
    click.echo(result.report.summary())
    click.echo(f"wrote {result.path} ({len(result.adapter)} LoRA modules, {len(result.report.kept_full)} full tensors, "
               f"{result.report.seconds:.1f}s)")
    if push_to_hub:
        pushed = publish_output(result.path, push_to_hub, private=private, commit_message=commit_message)
        click.echo(f"pushed to {pushed.repo_id} (commit {pushed.commit}): {pushed.url}")
