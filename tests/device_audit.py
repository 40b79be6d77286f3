"""Device checks that run on a CPU-only machine.

The device defects of a maths function look the same on every machine: a tensor made by a torch
factory (``torch.zeros``, ``torch.tensor``, …) without ``device=`` is born on the CPU, and the
first operation that meets it with CUDA tensors fails (``torch.searchsorted`` with a CPU target,
CPU zeros multiplied by device bases). :class:`HostTensorAudit` records every such factory call
that loramerge's own code makes, so a test can run a method on the CPU and assert that nothing
in it would have stayed behind on another device. Random draws with an explicit ``generator=``
are exempt: loramerge draws them on the CPU on purpose, so that masks are the same on every
device, and moves them.

It also records any operation whose tensor arguments sit on different devices, which on a GPU
machine catches the mixing itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import loramerge

PACKAGE = Path(loramerge.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.scalar_tensor,
    torch.empty_strided,
}


@dataclass
class HostTensorAudit(TorchFunctionMode):
    """A torch function mode that records host-made tensors and mixed-device operations in loramerge code."""

    host_made: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self._threads = 1

    # A torch function mode holds for the current thread only, and the merge engine runs modules
    # on a thread pool as wide as torch's thread count: with one torch thread it runs them here.
    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = _loramerge_caller()
        if caller is not None:
            if func in FACTORIES and kwargs.get("device") is None and kwargs.get("generator") is None:
                self.host_made.append(f"{func.__name__} at {caller}")
            devices = {t.device for t in _tensors(args, kwargs) if t.dim() > 0}
            if len(devices) > 1:
                self.mixed.append(f"{getattr(func, '__name__', func)} on {sorted(map(str, devices))} at {caller}")
        return func(*args, **kwargs)

    def assert_clean(self) -> None:
        assert not self.host_made, "tensors made on the CPU inside device maths:\n" + "\n".join(self.host_made)
        assert not self.mixed, "operations mixing devices:\n" + "\n".join(self.mixed)


def _loramerge_caller() -> str | None:
    """``file:line`` of the first frame outside torch, if it is in the loramerge package."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not path.is_relative_to(TORCH) and path.name != "device_audit.py":
            if path.is_relative_to(PACKAGE):
                return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))
