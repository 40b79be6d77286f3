"""One folded tensor as a stream of row blocks, from the base file to the writer.

A tensor with plain updates is streamed in row blocks, so the resident memory is a few blocks and
the adapters, never a shard; a DoRA weight (its norms need every row) and a vector are held
whole. How the blocks reach the compute device is :mod:`loramerge.fold.transfer`'s business.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loramerge.fold.apply import Factors, apply_rows, apply_whole, check_finite, may_overflow, prepare
from loramerge.fold.plan import Update
from loramerge.fold.transfer import Buffers, DeviceTransfer, Pending, TransferPlan, blocks
from loramerge.io.checkpoint import Checkpoint, TensorInfo


class BlockStream:
    """What every tensor of one fold shares: the compute dtype and device, and the reused buffers."""

    def __init__(self, plan: TransferPlan, compute: torch.dtype) -> None:
        self.plan = plan
        self.compute = compute
        self.buffers = Buffers()
        self.transfer = DeviceTransfer(plan, compute) if plan.staged else None

    @property
    def device(self) -> torch.device:
        return self.plan.device


def folded_blocks(ckpt: Checkpoint, source: TensorInfo, updates: list[Update], out_dtype: torch.dtype,
                  stream: BlockStream, name: str | None = None,
                  widened: tuple[int, ...] | None = None) -> Iterator[torch.Tensor]:
    """The folded tensor as row blocks in ``out_dtype`` (host tensors the caller writes before asking for more).

    ``name`` is the output tensor's, for messages (an untied ``lm_head`` is read from its embedding).
    ``widened`` is the wider shape a Flux control LoRA gives its input layer (see
    :attr:`~loramerge.fold.plan.FoldPlan.widened`): the base fills its first columns, zeros the others.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from loramerge.core.adapter import LowRank
        >>> from loramerge.fold.transfer import transfer_plan
        >>> from loramerge.io.checkpoint import open_checkpoint
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"fc.weight": torch.zeros(2, 3)}, folder / "model.safetensors")
        >>> ckpt = open_checkpoint(folder)
        >>> update = Update("lora", "a", "fc", 1.0, LowRank(torch.ones(1, 3), torch.ones(2, 1)))
        >>> stream = BlockStream(transfer_plan(torch.device("cpu")), torch.float32)
        >>> [b.tolist() for b in folded_blocks(ckpt, ckpt.tensors["fc.weight"], [update], torch.bfloat16, stream)]
        [[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
    """
    active = [u for u in updates if u.weight != 0.0]
    name = name or source.name
    if not active:
        yield from _converted_blocks(ckpt, source, out_dtype)
        return
    prepared = [prepare(u, stream.compute, stream.device) for u in active]
    if any(u.kind == "dora" for u in active) or len(source.shape) < 2 or widened is not None:
        yield _whole(ckpt, source, active, prepared, out_dtype, stream, name, widened)
    elif stream.transfer is not None:
        yield from _staged_blocks(ckpt, source, active, prepared, out_dtype, stream.transfer, name)
    else:
        yield from _mapped_blocks(ckpt, source, active, prepared, out_dtype, stream, name)


def _converted_blocks(ckpt: Checkpoint, source: TensorInfo, out_dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """A tensor no update touches, in ``out_dtype``: converted on the host (no maths, nothing to send)."""
    if not source.shape:
        yield ckpt.read(source.name).to(out_dtype)
        return
    for start, stop in blocks(source.shape):
        yield ckpt.read_rows(source.name, start, stop).to(out_dtype)


def _whole(ckpt: Checkpoint, source: TensorInfo, active: list[Update], prepared: list[Factors],
           out_dtype: torch.dtype, stream: BlockStream, name: str, widened: tuple[int, ...] | None = None
           ) -> torch.Tensor:
    """The tensor folded in one piece: DoRA's norms need every row; a widened input layer is small."""
    if stream.transfer is None:
        W = ckpt.read(source.name).to(device=stream.device, dtype=stream.compute)
    else:
        W = stream.transfer.upload(ckpt, source, 0, source.shape[0] if source.shape else 1)
    if widened is not None:
        wide = W.new_zeros(widened)
        wide[:, :W.shape[1]] = W
        W = wide
    result = apply_whole(W, active, prepared)
    check_finite(result, name)
    if stream.transfer is None:
        return result.to(out_dtype)
    return stream.transfer.finish(stream.transfer.download(result, out_dtype, check_finite=False))


def _mapped_blocks(ckpt: Checkpoint, source: TensorInfo, active: list[Update], prepared: list[Factors],
                   out_dtype: torch.dtype, stream: BlockStream, name: str) -> Iterator[torch.Tensor]:
    """On the CPU: each block converted from the page cache into a work buffer, updated, converted out."""
    buffers = stream.buffers
    checked = out_dtype == torch.float16 or may_overflow(active, prepared, stream.compute)
    with ckpt.mapped(source.name) as stored:
        for start, stop in blocks(source.shape, stream.plan.block_elements):
            shape = (stop - start, *source.shape[1:])
            block = buffers.work(shape, stream.compute, stream.device)
            block.copy_(stored[start:stop])
            for update, factors in zip(active, prepared):
                apply_rows(block, update, factors, start, stop)
            result = buffers.out(shape, out_dtype)
            result.copy_(block)
            if checked:  # a cast to fp16, or updates large enough to overflow: otherwise finite in, finite out
                check_finite(result, name)
            yield result


def _staged_blocks(ckpt: Checkpoint, source: TensorInfo, active: list[Update], prepared: list[Factors],
                   out_dtype: torch.dtype, transfer: DeviceTransfer, name: str) -> Iterator[torch.Tensor]:
    """On an accelerator: one block in flight, so block i+1 is read from disk while the device works on block i."""
    pending: Pending | None = None
    checked = out_dtype == torch.float16 or may_overflow(active, prepared, transfer.compute)
    for start, stop in blocks(source.shape, transfer.plan.block_elements):
        block = transfer.upload(ckpt, source, start, stop)
        for update, factors in zip(active, prepared):
            apply_rows(block, update, factors, start, stop)
        ready = transfer.download(block, out_dtype, check_finite=checked)
        if pending is not None:
            yield _landed(transfer, pending, name)
        pending = ready
    if pending is not None:
        yield _landed(transfer, pending, name)


def _landed(transfer: DeviceTransfer, pending: Pending, name: str) -> torch.Tensor:
    host = transfer.finish(pending)
    if pending.finite is not None and not bool(pending.finite):
        check_finite(host, name)  # the sum overflowed, or an entry did: the scan tells
    return host
