"""The device boundary: which device and precision the maths runs in, and how tensors cross to it.

One :class:`ExecutionContext` holds the decisions a merge, a fold or an extraction makes once:

- the **compute device** (``--device``: ``auto`` = CUDA when available, else the CPU), validated by
  :func:`resolve_device` before any source is loaded or downloaded;
- the **storage device**, where sources are read and results are kept: always the CPU;
- the **compute dtype** (float32 by default; decompositions never run in half precision, see
  :mod:`loramerge.core.linalg`);
- per method, **whether it runs on the accelerator** at all (:meth:`ExecutionContext.device_for`):
  methods that build dense ``m×n`` updates do; factor-space methods that work on ``R×R`` cores
  stay on the CPU, where their many small decompositions do not pay a launch and a
  synchronisation each (mergekit's ``uses_accelerator`` makes the same split).

Crossing the boundary: :func:`move` converts dtypes on the accelerator's side of a copy (a
blocking host → CUDA copy with a dtype change otherwise converts on the CPU), and
:class:`HostToDevice` streams large tensors through reusable pinned blocks with non-blocking
copies. :func:`device_errors` turns an out-of-memory error or an operation that the device does
not implement for a dtype into a one-line :class:`~loramerge.errors.LoramergeError` that names
the module and says what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loramerge.errors import InvalidParameter, LoramergeError, OutOfMemory

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
DTYPE_CHOICES = ("fp32", "fp16", "bf16")
DEVICE_USAGE = "use auto, cpu, cuda or cuda:N"
CPU = torch.device("cpu")

# Two pinned blocks of this size carry a large host → device copy (see HostToDevice).
PINNED_BLOCK_BYTES = 64 * 2**20


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``--device``: ``auto`` (or None) means CUDA when available, else the CPU.

    Validated without touching any file: an unknown name (``gpu``, ``tpu:7``, garbage), a
    device type loramerge does not run on (``mps``, ``meta``, …), CUDA on a machine without it,
    or a CUDA ordinal the machine does not have (``cuda:7`` with one GPU) is an
    :class:`~loramerge.errors.InvalidParameter` saying what to use. This is the one entry point
    that merge, fold and extract (and the CLI's ``--device``) go through.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu")
        Traceback (most recent call last):
        ...
        loramerge.errors.InvalidParameter: unknown device 'gpu'; use auto, cpu, cuda or cuda:N (an NVIDIA GPU is 'cuda')
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise InvalidParameter(f"device must be a name such as 'cuda:0', got {device!r}; {DEVICE_USAGE}",
                               parameter="device")
    name = device.strip().lower() if isinstance(device, str) else str(device)
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        hint = " (an NVIDIA GPU is 'cuda')" if name.split(":")[0] in ("gpu", "nvidia") else ""
        raise InvalidParameter(f"unknown device {str(device)!r}; {DEVICE_USAGE}{hint}", parameter="device") from None
    if resolved.type == "cpu":
        return CPU
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameter(f"--device {name} was asked for but no CUDA device is available; use --device cpu "
                                   "(or auto)", parameter="device")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
            raise InvalidParameter(f"--device {name}: this machine has {count} CUDA device(s) ({have}); use one of "
                                   "those, or cpu", parameter="device")
        return resolved
    if resolved.type == "mps":
        raise InvalidParameter("--device mps is not supported: the factor-space maths needs float64, which MPS does not "
                               "have; use --device cpu", parameter="device")
    raise InvalidParameter(f"--device {name}: {resolved.type} devices are not supported; {DEVICE_USAGE}",
                           parameter="device")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from ``fp16``/``bf16``/``fp32``/``float16``/... or a dtype; None stays None.

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if found is None:
        raise InvalidParameter(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}", parameter="dtype")
    return found


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` → ``bf16``."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    return names.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else "-"


@dataclass(frozen=True)
class ExecutionContext:
    """Where and in what precision the work runs: one object instead of loose ``device``/``dtype`` arguments.

    ``device`` is the compute device, ``storage`` the device sources are read to and results are
    returned on (the CPU), ``compute_dtype`` the precision of the maths.

    Example:
        >>> ctx = execution_context("cpu", "fp64")
        >>> ctx.device_for(uses_accelerator=True), ctx.compute_dtype
        (device(type='cpu'), torch.float64)
    """

    device: torch.device
    compute_dtype: torch.dtype = torch.float32
    storage: torch.device = field(default=CPU)

    @property
    def accelerated(self) -> bool:
        """True when the compute device is not the storage device."""
        return self.device != self.storage

    def device_for(self, uses_accelerator: bool) -> torch.device:
        """The device a method runs on: the compute device, or the storage device (the CPU) for a
        method whose work is too small to gain from an accelerator."""
        return self.device if uses_accelerator else self.storage

    def to_storage(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` back on the storage device, in ``dtype`` (converted on the compute side)."""
        return move(tensor, self.storage, dtype)


def execution_context(device: str | torch.device | None = "auto",
                      compute_dtype: str | torch.dtype | None = torch.float32) -> ExecutionContext:
    """Validate ``device`` and ``compute_dtype`` (before any source is loaded) into an :class:`ExecutionContext`.

    Example:
        >>> execution_context("cpu").compute_dtype
        torch.float32
    """
    target = resolve_device(device)
    compute = parse_dtype(compute_dtype) or torch.float32
    if not compute.is_floating_point:
        raise InvalidParameter(f"compute dtype must be a floating type, got {compute}", parameter="compute_dtype")
    return ExecutionContext(target, compute)


def move(tensor: torch.Tensor, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (default: where it is) in ``dtype`` (default: its own), converted on the accelerator.

    Host → accelerator copies the stored bytes and converts on the device; accelerator → host
    converts first, on the device. (A blocking copy with a dtype change would otherwise convert on
    the CPU.) A pinned host tensor is copied without blocking.

    Example:
        >>> move(torch.ones(2, dtype=torch.bfloat16), "cpu", torch.float32).dtype
        torch.float32
    """
    target = tensor.device if device is None else torch.device(device)
    dtype = dtype or tensor.dtype
    if target == tensor.device:
        return tensor.to(dtype)
    if target.type == "cpu":
        return tensor.to(dtype).to(target)
    return tensor.to(target, non_blocking=tensor.device.type == "cpu" and tensor.is_pinned()).to(dtype)


class HostToDevice:
    """Copies host tensors to an accelerator through two reusable pinned blocks, converting dtypes on the device.

    A copy from pageable memory is synchronous and passes through the driver's own small staging
    buffer. Here each block of the source is copied into pinned memory and sent with a
    non-blocking copy, so the device transfer of one block overlaps the host copy of the next;
    a block is refilled only once its previous transfer has finished. The stored bytes travel (a
    bf16 checkpoint moves half the bytes of its float32 form) and the dtype is converted on the
    device. On the CPU this is a plain conversion.

    Example:
        >>> to_device = HostToDevice(torch.device("cpu"))
        >>> to_device(torch.ones(3, dtype=torch.bfloat16), torch.float32).dtype
        torch.float32
    """

    def __init__(self, device: torch.device, block_bytes: int = PINNED_BLOCK_BYTES) -> None:
        self.device = device
        self.block_bytes = block_bytes
        self._blocks: list[torch.Tensor] = []
        self._pending: list[torch.cuda.Event | None] = [None, None]

    def __call__(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.device.type == "cpu" or tensor.device.type != "cpu":
            return move(tensor, self.device, dtype)
        return self.staged(tensor, dtype)

    def staged(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The block-by-block copy itself (what ``__call__`` does for an accelerator)."""
        source = tensor.contiguous().reshape(-1).view(torch.uint8)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        target = out.reshape(-1).view(torch.uint8)
        for number, start in enumerate(range(0, source.numel(), self.block_bytes)):
            stop = min(source.numel(), start + self.block_bytes)
            slot = number % 2
            block = self._block(slot)[: stop - start]
            self._wait(slot)
            block.copy_(source[start:stop])
            target[start:stop].copy_(block, non_blocking=True)
            self._record(slot)
        return out.to(dtype or tensor.dtype)

    def _block(self, slot: int) -> torch.Tensor:
        while len(self._blocks) <= slot:
            pin = self.device.type == "cuda"
            self._blocks.append(torch.empty(self.block_bytes, dtype=torch.uint8, device=CPU, pin_memory=pin))
        return self._blocks[slot]

    def _wait(self, slot: int) -> None:
        event = self._pending[slot]
        if event is not None:
            event.synchronize()
            self._pending[slot] = None

    def _record(self, slot: int) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._pending[slot] = event

    def close(self) -> None:
        """Wait for the transfers in flight and release the pinned blocks."""
        for slot in range(len(self._pending)):
            self._wait(slot)
        self._blocks.clear()


_OUT_OF_MEMORY_TEXT = ("out of memory", "can't allocate memory")
_NOT_IMPLEMENTED = re.compile(r"\"?(\w+)\"? not implemented for '(\w+)'")


@contextmanager
def device_errors(device: torch.device, *, module: str | None = None, path: str | None = None) -> Iterator[None]:
    """Turn out-of-memory and unsupported-dtype errors raised inside into one-line loramerge errors.

    A :class:`~loramerge.errors.LoramergeError` passing through gets ``module`` and ``path`` filled
    in where it lacks them. Torch's own out-of-memory errors (CUDA's, and the CPU allocator's)
    become :class:`~loramerge.errors.OutOfMemory`; "``op`` not implemented for ``dtype``" becomes
    :class:`~loramerge.errors.InvalidParameter` about the compute dtype.

    Example:
        >>> with device_errors(torch.device("cpu"), module="fc"):
        ...     raise NotImplementedError("\\"geqrf_cpu\\" not implemented for 'BFloat16'")
        Traceback (most recent call last):
        ...
        loramerge.errors.InvalidParameter: module fc: geqrf_cpu is not implemented for BFloat16 on cpu; use --compute-dtype fp32 (compute_dtype=torch.float32)
    """
    where = f"module {module}" if module else (str(path) if path else "the work")
    try:
        yield
    except LoramergeError as exc:
        exc.fill(module=module, path=path)
        raise
    except (RuntimeError, NotImplementedError) as exc:
        text = str(exc)
        if isinstance(exc, torch.OutOfMemoryError) or any(t in text for t in _OUT_OF_MEMORY_TEXT):
            raise OutOfMemory(f"{where}: {device} ran out of memory{_asked(text)}; {_memory_advice(device)}",
                              module=module, path=path) from None
        unsupported = _NOT_IMPLEMENTED.search(text)
        if unsupported:
            op, dtype = unsupported.groups()
            raise InvalidParameter(f"{where}: {op} is not implemented for {dtype} on {device}; use --compute-dtype "
                                   "fp32 (compute_dtype=torch.float32)", module=module, path=path,
                                   parameter="compute_dtype") from None
        raise


def _asked(text: str) -> str:
    size = re.search(r"(?:allocate|Tried to allocate) ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    return f" allocating {size.group(1)}" if size else ""


def _memory_advice(device: torch.device) -> str:
    if device.type == "cuda":
        return ("free memory on the GPU (other processes), set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
                "or run with --device cpu")
    return "free memory, close other programs, or merge fewer sources at once"


@contextmanager
def one_core_spare() -> Iterator[None]:
    """Run torch's CPU thread pool one thread short (at least one) for the duration.

    OpenMP threads spin at every barrier, so when every core is in torch's pool, any other
    runnable thread (a writer thread, the progress bar, another process) preempts one pool thread
    and the rest wait for it. On 2 shared cores this made small QR/SVD calls 100x slower and a
    3.2 GB fold 2-3x slower; one spare core costs at most 1/n of the throughput.

    Example:
        >>> before = torch.get_num_threads()
        >>> with one_core_spare():
        ...     torch.get_num_threads() == max(1, before - 1)
        True
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)
