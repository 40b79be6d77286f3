"""Pieces the benchmarks share: Llama-2-7B-shaped synthetic adapters and median timing.

The benchmarks run as scripts (``python benchmarks/NAME.py``), so this folder is first on
``sys.path`` and they import this module as ``common``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.core.devices import resolve_device

T = TypeVar("T")

LLAMA_SHAPES = {  # Llama-2-7B: module → (out, in)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def llama_adapter(seed: int, layers: int, *, rank: int = 16,
                  shapes: dict[str, tuple[int, int]] = LLAMA_SHAPES) -> Adapter:
    """A random LoRA (scale 2, PEFT-like magnitudes) on ``layers`` Llama layers of the given module shapes."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(layers):
        for name, (out_f, in_f) in shapes.items():
            modules[f"model.layers.{i}.{name}"] = LowRank(
                torch.randn(rank, in_f, generator=g) / in_f**0.5, torch.randn(out_f, rank, generator=g) * 0.02,
                scale=2.0,
            )
    return Adapter(modules, base_model="meta-llama/Llama-2-7b-hf", task_type="CAUSAL_LM")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``auto``), as loramerge's own option: auto (CUDA when available, else CPU), cpu, cuda[:N]."""
    parser.add_argument("--device", default="auto",
                        help="compute device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N [default: auto]")


def chosen_device(name: str) -> torch.device:
    """``--device`` resolved and validated the way loramerge does it."""
    return resolve_device(name)


def device_label(device: torch.device) -> str:
    """``cpu (16 threads)`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``, for a benchmark's header."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize() -> None:
    """Wait for queued GPU work, so a timing covers it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], repeats: int, *, warmup: bool = True) -> tuple[float, T]:
    """The median wall time of ``repeats`` calls of ``fn`` and the last result.

    The warm-up call keeps lazy LAPACK initialisation and allocator growth out of the figures;
    skip it for baselines too slow to run twice. GPU work is waited for before each clock read.
    """
    if warmup:
        fn()
        synchronize()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result  # type: ignore[return-value]
