"""Device and dtype resolution shared by the API and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loramerge.errors import InvalidParameter

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) means CUDA when available, else the CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("--device cuda was asked for but no CUDA device is available")
    return resolved


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
        raise InvalidParameter(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return found


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` → ``bf16``."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    return names.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else "-"


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
