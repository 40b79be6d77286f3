"""How a fold moves tensor blocks between the files and the compute device, and the buffers it reuses.

On the CPU a block is converted straight from the page cache into a small float32 work buffer:
blocks of :data:`CPU_BLOCK_ELEMENTS` stay in cache between the conversion, the update and the
writer's copy. On an accelerator the cost is the bus and the launches instead, so a block is
large, its bytes go over in their stored dtype (half the bytes of float32 for bf16) and are
converted on the device, and on CUDA the host side is page-locked, so that every copy is
asynchronous (``non_blocking=True``) and the next block is read from disk while the device works
on this one (:mod:`loramerge.fold.streaming` keeps one block in flight).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loramerge.io.checkpoint import Checkpoint, TensorInfo

# Elements per block of maths and per write on the CPU: 2 MB of float32. Small blocks stay in cache
# between the conversion, the update and the writer's copy; on the 3.2 GB benchmark 512K-element
# blocks folded in 4.6-5.6 s against 5.8-7.3 s at 1M, 6.4-9.5 s at 2M and 11-13 s at 32M.
CPU_BLOCK_ELEMENTS = 1 << 19
# On an accelerator: 8M elements (16 MB of bf16 over the bus, 32 MB of float32 on the device), so
# the launches, events and file reads of a block are few against its transfer.
DEVICE_BLOCK_ELEMENTS = 1 << 23
# A background writer holds at most two blocks; one more is being filled, and on an accelerator a
# fourth is in flight from the device while the writer takes the ones before it.
_OUT_RING = {False: 3, True: 4}
_IN_SLOTS = 2  # double buffering: the next block is read while the last one is still uploading


@dataclass(frozen=True)
class TransferPlan:
    """How blocks travel to ``device``: straight (the CPU) or staged through host buffers, pinned or not.

    ``staged``: each block is read into a host buffer in its stored dtype, copied to the device
    and converted there. ``pinned``: those host buffers are page-locked, so the copies are
    asynchronous (``non_blocking``) and overlap the reads.
    """

    device: torch.device
    staged: bool
    pinned: bool
    block_elements: int

    @property
    def non_blocking(self) -> bool:
        return self.pinned


def transfer_plan(device: torch.device) -> TransferPlan:
    """The plan for a fold computing on ``device``: large pinned asynchronous blocks on CUDA.

    Example:
        >>> transfer_plan(torch.device("cpu"))
        TransferPlan(device=device(type='cpu'), staged=False, pinned=False, block_elements=524288)
        >>> cuda = transfer_plan(torch.device("cuda", 0))
        >>> cuda.staged, cuda.pinned, cuda.non_blocking, cuda.block_elements
        (True, True, True, 8388608)
        >>> transfer_plan(torch.device("mps")).pinned  # no page-locked memory there: plain copies
        False
    """
    if device.type == "cpu":
        return TransferPlan(device, staged=False, pinned=False, block_elements=CPU_BLOCK_ELEMENTS)
    return TransferPlan(device, staged=True, pinned=device.type == "cuda", block_elements=DEVICE_BLOCK_ELEMENTS)


def blocks(shape: tuple[int, ...], elements: int = CPU_BLOCK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``elements`` entries covering a tensor of ``shape``.

    Example:
        >>> list(blocks((5, 4), elements=8)), list(blocks(())), list(blocks((0, 3)))
        ([(0, 2), (2, 4), (4, 5)], [(0, 1)], [(0, 0)])
    """
    if not shape:
        yield 0, 1
        return
    step = max(1, min(shape[0], elements // max(1, math.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)
    if shape[0] == 0:
        yield 0, 0


def host_buffer(count: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A flat host buffer of ``count`` elements, page-locked when ``pinned``."""
    return torch.empty(count, dtype=dtype, pin_memory=pinned)


def to_device(target: torch.Tensor, source: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    """Copy ``source`` into ``target`` across the bus (the one place a fold does so)."""
    return target.copy_(source, non_blocking=non_blocking)


class Buffers:
    """Block buffers reused across all tensors of a fold on the CPU.

    Allocating a fresh block per tensor costs more than the maths (large allocations come from
    mmap, so every one page-faults on first touch). Output blocks rotate through three buffers
    per dtype because a background writer holds at most two.
    """

    def __init__(self) -> None:
        self._work: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._ring: dict[torch.dtype, list[torch.Tensor]] = {}
        self._turn: dict[torch.dtype, int] = {}

    def work(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        held = self._work.get((dtype, device))
        if held is None or held.numel() < count:
            held = self._work[(dtype, device)] = torch.empty(count, dtype=dtype, device=device)
        return held[:count].view(shape)

    def out(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        ring = self._ring.setdefault(dtype, [torch.empty(0, dtype=dtype) for _ in range(_OUT_RING[False])])
        turn = self._turn.get(dtype, 0)
        self._turn[dtype] = turn + 1
        slot = turn % len(ring)
        if ring[slot].numel() < count:
            ring[slot] = torch.empty(count, dtype=dtype)  # the old one lives on in a pending write
        return ring[slot][:count].view(shape)


@dataclass
class Pending:
    """A block on its way back to the host: ready once ``event`` has completed."""

    host: torch.Tensor
    event: Any = None
    finite: torch.Tensor | None = None  # a host flag the device fills in, when the output can overflow


class DeviceTransfer:
    """Moves blocks to the compute device and back through reused (pinned, on CUDA) host buffers.

    :meth:`upload` reads rows of a tensor into a host slot in their stored dtype, copies them to
    the device and converts them there; :meth:`download` converts a result on the device and
    copies it into the next host output buffer; :meth:`finish` waits for that copy. Everything
    runs in order on the device's current stream, so device buffers are reused freely; a host
    buffer is reused only after the event recorded behind its copy has completed.
    """

    def __init__(self, plan: TransferPlan, compute: torch.dtype) -> None:
        self.plan = plan
        self.compute = compute
        self._device: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._inbound: list[tuple[torch.Tensor, Any]] = [(torch.empty(0, dtype=torch.uint8), None)] * _IN_SLOTS
        self._outbound: dict[torch.dtype, list[torch.Tensor]] = {}
        self._flags = [host_buffer(1, torch.bool, plan.pinned) for _ in range(_OUT_RING[True])]
        self._turns = {"in": 0, "out": 0}

    def upload(self, ckpt: Checkpoint, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``info`` on the device in the compute dtype (a reused buffer)."""
        slot = self._turn("in", _IN_SLOTS)
        raw, event = self._inbound[slot]
        if event is not None:
            event.synchronize()  # the copy out of this slot, two blocks ago, has finished
        assert info.torch_dtype is not None
        nbytes = ((stop - start) * math.prod(info.shape[1:]) if info.shape else 1) * info.torch_dtype.itemsize
        if raw.numel() < nbytes:
            raw = host_buffer(nbytes, torch.uint8, self.plan.pinned)
        host = ckpt.read_rows(info.name, start, stop, buffer=raw)
        shape = tuple(host.shape) if info.shape else ()
        staged = to_device(self._buffer("staged", host.dtype, shape), host.reshape(shape), self.plan.non_blocking)
        self._inbound[slot] = (raw, self._record())
        if staged.dtype == self.compute:
            return staged
        return self._buffer("work", self.compute, shape).copy_(staged)  # the dtype conversion, on the device

    def download(self, block: torch.Tensor, out_dtype: torch.dtype, check_finite: bool) -> Pending:
        """Start copying ``block`` to the host in ``out_dtype`` (converted on the device)."""
        shape = tuple(block.shape)
        result = block if block.dtype == out_dtype else self._buffer("out", out_dtype, shape).copy_(block)
        slot = self._turn("out", _OUT_RING[True])
        ring = self._outbound.setdefault(out_dtype, [torch.empty(0, dtype=out_dtype)] * _OUT_RING[True])
        count = math.prod(shape)
        if ring[slot].numel() < count:
            ring[slot] = host_buffer(count, out_dtype, self.plan.pinned)  # the old one lives on in a pending write
        host = to_device(ring[slot][:count].view(shape), result, self.plan.non_blocking)
        finite = None
        if check_finite:
            finite = to_device(self._flags[slot][0], torch.isfinite(result.sum()), self.plan.non_blocking)
        return Pending(host, self._record(), finite)

    def finish(self, pending: Pending) -> torch.Tensor:
        """The host block of ``pending``, once its copy has completed."""
        if pending.event is not None:
            pending.event.synchronize()
        return pending.host

    def _buffer(self, role: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        held = self._device.get((role, dtype))
        if held is None or held.numel() < count:
            held = self._device[(role, dtype)] = torch.empty(count, dtype=dtype, device=self.plan.device)
        return held[:count].view(shape)

    def _turn(self, kind: str, slots: int) -> int:
        turn = self._turns[kind]
        self._turns[kind] = turn + 1
        return turn % slots

    def _record(self) -> Any:
        """An event behind the copies queued so far; None where copies are synchronous."""
        if not self.plan.non_blocking or self.plan.device.type != "cuda":
            return None
        return torch.cuda.current_stream(self.plan.device).record_event()
