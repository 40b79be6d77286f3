"""Folding adapters into a base model's weights, streamed tensor by tensor: :func:`fold`.

``fold(base, adapters, output=...)`` writes a new model folder: the same tensor names, sharding
(or ``shard_size``) and dtypes (or ``dtype``), a rewritten index, every non-weight file copied,
and a ``loramerge.json`` with the recipe and the sources' fingerprints. Two image-generation
bases are handled too: a single-file ``.safetensors`` checkpoint (SD/SDXL/Flux; written as one
file, recipe in its metadata; names resolved by :mod:`loramerge.io.single_file`, where q/k/v may be
row slices of a fused weight) and a diffusers pipeline folder (each touched component folded as
its own model folder).

What is added to each weight, in float32 and rounded once to the stored dtype (PEFT's
``merge_and_unload``, see reference/peft.md §3):

- LoRA: W ← W + w·s·B@A, transposed for GPT-2 Conv1D and embeddings (orientation checked
  against the base tensor's shape), reshaped for convolutions.
- DoRA: W ← W + w·(m/‖W₀ + ΔW‖ ⊙ (W + ΔW) − W), the norm taken per output channel against the
  unmerged weight W₀. With w = 1 this is PEFT's sequential fold; 0 < w < 1 moves part of the way.
- ``lora_bias``: b ← b + w·s·b_B. Full weights (``modules_to_save``, trained biases) replace the
  tensor (w = 1) or interpolate towards it.

Several adapters with ``linear``/``cat`` and no rank option are folded one after another, which
is their exact sum (and PEFT's semantics for DoRA); any other method merges them first with
:func:`loramerge.merge.engine.merge` and folds the result.

Memory: a tensor with plain updates is streamed in row blocks from the input file to the output
file, so the resident memory is a few blocks and the adapters, never a shard. A DoRA weight is
held whole (its norms need every row).

The parts, one job each: :mod:`~loramerge.fold.job` (settings and result),
:mod:`~loramerge.fold.plan` (which tensor each module changes), :mod:`~loramerge.fold.bases`
(were the adapters made for this base), :mod:`~loramerge.fold.resolvers`,
:mod:`~loramerge.fold.layout` (the output's shards), :mod:`~loramerge.fold.writer`,
:mod:`~loramerge.fold.streaming` and :mod:`~loramerge.fold.transfer` (blocks to the device and
back), :mod:`~loramerge.fold.apply` (the maths), :mod:`~loramerge.fold.pipelines` (diffusers
pipeline folders) and :mod:`~loramerge.fold.record` (``loramerge.json``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter
from loramerge.core.devices import parse_dtype, resolve_device
from loramerge.core.rank import RankPolicy
from loramerge.errors import InvalidParameter, LoramergeError, UnsupportedAdapter, WriteFailed
from loramerge.fold.bases import check_bases, check_family
from loramerge.fold.job import FoldJob, FoldResult, fold_dtype, fold_weights, tied_mode
from loramerge.fold.layout import OutShard, check_space, plan_layout
from loramerge.fold.pipelines import PIPELINE_INDEX, fold_pipeline, pipeline_family
from loramerge.fold.plan import FoldPlan, plan_fold
from loramerge.fold.quant import (
    BaseQuant,
    QuantPlan,
    drops_quantization_config,
    open_fold_base,
    output_dtype,
    quant_plan,
    requantize,
)
from loramerge.fold.record import RECIPE_NAME, base_info, fold_record, single_file_metadata, write_record
from loramerge.fold.resolvers import default_resolver
from loramerge.fold.writer import copy_plain_files, write_config, write_model
from loramerge.io.checkpoint import Checkpoint, iter_plain_files
from loramerge.io.formats.tensorfile import read_json_object
from loramerge.io.names import Resolver
from loramerge.io.output import atomic_output, check_output
from loramerge.io.shards import parse_size
from loramerge.io.sources import load, resolve_model
from loramerge.merge.blocks import BlockWeighting, weigh_blocks
from loramerge.merge.engine import merge

Units = list[tuple[Adapter, float]]


def fold(
    base: str | Path,
    adapters: Adapter | str | Path | Sequence[Adapter | str | Path],
    *,
    output: str | Path,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    rank_max: int | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = "keep",
    shard_size: str | int | None = None,
    device: str | torch.device = "auto",
    compute_dtype: str | torch.dtype = "fp32",
    tied_embeddings_mode: str = "refuse",
    force: bool = False,
    strict: bool = False,
    allow_pickle: bool = False,
    ignore_base_mismatch: bool = False,
    resolver: Resolver | None = None,
    progress: bool = False,
    follow_symlinks: bool = False,
    block_weights: BlockWeighting | str | Sequence[str] | None = None,
    base_quant: str | BaseQuant | None = None,
    keep_quant: bool = False,
    quantize: str | None = None,
    double_quant: bool = False,
    **params: Any,
) -> FoldResult:
    """Fold one or more adapters into the base model at ``base`` and write the model to ``output``.

    ``base`` is a model folder (written as a folder), or a single-file ``.safetensors`` checkpoint
    (SD 1.x/2.x, SDXL, Flux.1 …, written as one ``.safetensors`` file at ``output`` with the same
    tensor names, order, dtypes and metadata, plus the recipe under the ``loramerge`` metadata key).
    ``resolver`` maps module paths to tensor names (:data:`~loramerge.io.names.Resolver`); by default
    :func:`~loramerge.io.names.hf_resolver` for a folder and a
    :class:`~loramerge.io.single_file.SingleFileResolver` for a single file.

    ``weights`` (one per adapter, default 1; negative subtracts a LoRA) scale each adapter. With
    several adapters, ``method`` and the rank options are those of :func:`loramerge.merge.engine`.
    ``dtype`` is ``"keep"`` or fp32/fp16/bf16 for every floating tensor; ``shard_size`` (``"5GB"``)
    re-shards. ``tied_embeddings_mode`` says what to do when an adapter changes one of two tied
    embeddings: ``refuse`` (default), ``untie`` (write both, set ``tie_word_embeddings: false``:
    the adapted model exactly) or ``shared`` (fold into the shared matrix, as PEFT does).
    ``strict`` refuses an adapter trained on another base model instead of warning. The base
    folder's other files are copied only when they are regular files inside it; a symbolic link
    that leaves it is refused unless ``follow_symlinks`` (never one to ``/proc``, a FIFO or a device).
    ``block_weights`` scales each adapter's modules by block first (see :mod:`loramerge.merge.blocks`).

    Quantized bases (:mod:`loramerge.fold.quant`): ``base_quant`` (``"nf4"``/``"fp4"``, or a
    :class:`~loramerge.io.quant.view.BaseQuant` for the block size, double quantization and skipped
    modules) folds into dequant(quant(W)) of every weight transformers quantizes in 4-bit, the
    weights a QLoRA adapter was trained against, and writes bfloat16 unless ``dtype`` says. A
    pre-quantized base (bitsandbytes 4/8-bit, FP8 block-scaled, GPTQ, AWQ) is dequantized on the
    fly and written in full precision, or, with ``keep_quant``, quantized again the same way
    (bitsandbytes, FP8). ``quantize`` (``"nf4"``/``"fp4"``, ``double_quant``) writes a pre-quantized
    bitsandbytes 4-bit checkpoint.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import Adapter, LowRank
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> from loramerge.io.checkpoint import open_checkpoint
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "base").mkdir()
        >>> write_safetensors({"fc.weight": torch.zeros(4, 3)}, root / "base" / "model.safetensors")
        >>> ad = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2), scale=0.5)})
        >>> result = fold(root / "base", ad, output=root / "out", weights=[2.0])
        >>> open_checkpoint(root / "out").read("fc.weight")[0].tolist()
        [2.0, 2.0, 2.0]
    """
    check_output(output, force=force)
    sources = _as_list(adapters)
    weighting = BlockWeighting.parse(block_weights, sources=len(sources))
    quant = quant_plan(base_quant, keep_quant, quantize, double_quant)
    job = FoldJob(
        output=Path(output), force=force, weights=fold_weights(weights, len(sources)), method=method,
        tied_mode=tied_mode(tied_embeddings_mode), out_dtype=output_dtype(quant, fold_dtype(dtype)),
        compute=parse_dtype(compute_dtype) or torch.float32, shard_limit=parse_size(shard_size),
        device=resolve_device(device),
        policy=RankPolicy.from_options(rank=rank, energy=energy, max_error=max_error, sv_ratio=sv_ratio,
                                       sv_cumulative=sv_cumulative, sv_fro=sv_fro, rank_max=rank_max),
        seed=seed, params=params, progress=progress, follow_symlinks=follow_symlinks,
    )
    target = _open_base(base, job, resolver, allow_pickle, quant)
    loaded = weigh_blocks([load(s, allow_pickle=allow_pickle) for s in sources], weighting)
    notes = _check_adapters(loaded, target, strict, ignore_base_mismatch)
    units = _units(loaded, job, ignore_base_mismatch)
    try:
        with _write_errors(job.output):
            if target.index is not None:
                return fold_pipeline(target.path, target.index, units, loaded, job, resolver, allow_pickle, notes)
            if target.single:
                return _fold_single_file(target, units, loaded, job, notes)
            return _fold_folder(target, units, loaded, job, notes)
    finally:
        if target.ckpt is not None:
            target.ckpt.release()


@dataclass
class _Target:
    """The base being folded into: a model folder or single file (``ckpt``) or a pipeline folder (``index``)."""

    path: Path
    single: bool
    index: dict[str, Any] | None = None
    ckpt: Checkpoint | None = None
    resolver: Resolver | None = None
    quant: QuantPlan = field(default_factory=QuantPlan)


def _open_base(base: str | Path, job: FoldJob, resolver: Resolver | None, allow_pickle: bool,
               quant: QuantPlan) -> _Target:
    """Find the base (downloading a Hub model) and read its layout: headers only."""
    base_path = Path(base).expanduser()
    single = base_path.is_file()
    if single and job.shard_limit is not None:
        raise InvalidParameter(f"{base}: a single-file checkpoint is written as one file; drop --shard-size")
    folder = base_path if single else resolve_model(base)
    pipeline = not single and (folder / PIPELINE_INDEX).is_file()
    if quant.active and (pipeline or single):
        raise InvalidParameter(f"{base}: --base-quant, --keep-quant and --quantize apply to model folders only")
    if pipeline:
        return _Target(folder, False, index=read_json_object(folder / PIPELINE_INDEX), resolver=resolver)
    ckpt = open_fold_base(folder, quant, allow_pickle, job.out_dtype)
    return _Target(folder, single, ckpt=ckpt, resolver=resolver or default_resolver(ckpt), quant=quant)


def _check_adapters(loaded: Sequence[Adapter], target: _Target, strict: bool, ignore_base_mismatch: bool) -> list[str]:
    """Warn about adapters trained on another base; refuse image LoRAs for another architecture."""
    if target.index is not None:
        notes = check_bases(loaded, target.path, {"_name_or_path": target.index.get("_name_or_path")}, strict)
        families = pipeline_family(target.index)
        described = f"a diffusers {target.index.get('_class_name', 'pipeline')} folder"
    else:
        assert target.ckpt is not None
        notes = check_bases(loaded, target.path, target.ckpt.config, strict)
        config = target.ckpt.config
        family = getattr(target.resolver, "family", None)
        families = [family] if family else pipeline_family(config)  # a denoiser folder names its class
        described = getattr(target.resolver, "describe", lambda: f"a {config.get('_class_name', 'model')} folder")()
    if not ignore_base_mismatch:
        check_family(loaded, families, f"{target.path} is {described}")
    return notes


def _units(loaded: Sequence[Adapter], job: FoldJob, ignore_base_mismatch: bool) -> Units:
    """What is folded: each adapter with its weight in turn, or their merge with weight 1."""
    if _sequential(job.method, job.policy, job.params):
        return list(zip(loaded, job.weights))
    try:
        merged = merge(loaded, method=job.method, weights=job.weights, **job.policy.as_dict(), seed=job.seed,
                       device=job.device, dtype=torch.float32, compute_dtype=job.compute,
                       ignore_base_mismatch=ignore_base_mismatch, progress=job.progress, **job.params)
    except UnsupportedAdapter as exc:
        raise UnsupportedAdapter(f"{exc}; fold such adapters with --method linear and no rank option, "
                                 "which applies them one after another") from None
    job.merge_report = merged.report
    return [(merged, 1.0)]


def _sequential(method: str, policy: RankPolicy, params: dict[str, Any]) -> bool:
    """True when folding the adapters one after another is exactly what ``method`` asks for."""
    from loramerge.merge.methods import canonical_name

    return canonical_name(method) in ("linear", "cat") and policy.is_exact and not params


def _plan(target: _Target, units: Units, job: FoldJob) -> tuple[FoldPlan, list[OutShard]]:
    """The fold plan and the output layout, checked against the free space."""
    assert target.ckpt is not None and target.resolver is not None
    plan = plan_fold(target.ckpt, units, resolver=target.resolver, tied_mode=job.tied_mode)
    layout = plan_layout(target.ckpt, plan, job.out_dtype, job.shard_limit)
    check_space(job.output, layout)
    return plan, layout


def _fold_single_file(target: _Target, units: Units, loaded: Sequence[Adapter], job: FoldJob,
                      notes: list[str]) -> FoldResult:
    """Write one ``.safetensors`` file, the record in its metadata."""
    plan, layout = _plan(target, units, job)
    assert target.ckpt is not None
    record = fold_record(job, base_info(target.path, target.ckpt), loaded, sorted(plan.updates), plan.notes, {})
    layout[0].metadata = single_file_metadata(layout[0].metadata, record)
    with atomic_output(job.output, force=job.force, directory=False) as tmp:
        written = write_model(target.ckpt, plan, layout, tmp.parent, job.compute, job.device, job.progress, file=tmp)
    return job.result(sorted(plan.updates), plan.module_count, len(layout), written, notes + plan.notes, record)


def _fold_folder(target: _Target, units: Units, loaded: Sequence[Adapter], job: FoldJob,
                 notes: list[str]) -> FoldResult:
    """Write a model folder: shards, index, config, every other file, and ``loramerge.json``."""
    plan, layout = _plan(target, units, job)
    ckpt = target.ckpt
    assert ckpt is not None
    # Listed (and every link checked) before any shard is written: a refusal costs nothing.
    extras = list(iter_plain_files(target.path, ckpt.weight_files | {"config.json", RECIPE_NAME},
                                   follow_symlinks=job.follow_symlinks))
    with atomic_output(job.output, force=job.force) as tmp:
        written = write_model(ckpt, plan, layout, tmp, job.compute, job.device, job.progress, job.shard_limit is None)
        config_changes = write_config(ckpt, tmp, job.out_dtype, plan.untie,
                                      drops_quantization_config(ckpt, target.quant), plan.config)
        quantization = requantize(tmp, ckpt, target.quant, job.out_dtype)
        copy_plain_files(target.path, tmp, extras)
        record = fold_record(job, base_info(target.path, ckpt), loaded, sorted(plan.updates), plan.notes,
                             config_changes)
        if quantization:
            record["quantization"] = quantization
        write_record(tmp, record)
    return job.result(sorted(plan.updates), plan.module_count, len(layout), written, notes + plan.notes, record)


@contextmanager
def _write_errors(output: Path) -> Iterator[None]:
    """Turn a failed write (a full disk, say) into :class:`~loramerge.errors.WriteFailed`."""
    try:
        yield
    except LoramergeError:
        raise  # already says what went wrong, even where it is also an OSError
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise WriteFailed(f"{output}: no space left on the device while writing the folded model; "
                              "nothing was written") from None
        raise WriteFailed(f"{output}: could not write the folded model ({exc.strerror or exc}); "
                          "nothing was written") from None


def _as_list(adapters: Adapter | str | Path | Sequence[Adapter | str | Path]) -> list[Adapter | str | Path]:
    if isinstance(adapters, (Adapter, str, Path)):
        return [adapters]
    return list(adapters)
