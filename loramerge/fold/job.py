"""The settings of one fold, checked, and what a fold returns."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.core.devices import parse_dtype
from loramerge.core.rank import RankPolicy
from loramerge.core.report import MergeReport
from loramerge.errors import InvalidParameter, NonFiniteValues
from loramerge.fold.plan import TIED_MODES

_FOLD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FoldResult:
    """What a fold wrote: the output folder, the tensors it changed and the recipe it recorded."""

    path: Path
    changed: list[str]
    modules: int
    shards: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    merge_report: MergeReport | None = None

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds else float("inf")
        return (
            f"wrote {self.path}: {self.modules} module update(s) in {len(self.changed)} tensor(s), "
            f"{self.shards} shard(s), {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f}s ({rate:.2f} GB/s)"
        )


@dataclass
class FoldJob:
    """The settings of one fold, as the writers and the record need them."""

    output: Path
    force: bool
    weights: list[float]
    method: str
    policy: RankPolicy
    seed: int
    params: dict[str, Any]
    out_dtype: torch.dtype | None
    shard_limit: int | None
    tied_mode: str
    compute: torch.dtype
    device: torch.device
    progress: bool
    merge_report: MergeReport | None = None
    follow_symlinks: bool = False
    started: float = field(default_factory=time.perf_counter)

    def result(self, changed: list[str], modules: int, shards: int, bytes_written: int, warnings: list[str],
               recipe: dict[str, Any]) -> FoldResult:
        """The :class:`FoldResult` of this job, timed from its start."""
        return FoldResult(
            path=self.output, changed=changed, modules=modules, shards=shards, bytes_written=bytes_written,
            seconds=time.perf_counter() - self.started, warnings=warnings, recipe=recipe,
            merge_report=self.merge_report,
        )


def fold_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One finite weight per adapter (default 1).

    Example:
        >>> fold_weights(None, 2), fold_weights([0.5, -1], 2)
        ([1.0, 1.0], [0.5, -1.0])
    """
    if not count:
        raise InvalidParameter("no adapters to fold")
    if weights is not None and len(weights) != count:
        raise InvalidParameter(f"got {len(weights)} weight(s) for {count} adapter(s); give one per adapter")
    weight_list = [float(w) for w in weights] if weights is not None else [1.0] * count
    if not all(math.isfinite(w) for w in weight_list):
        raise NonFiniteValues(f"weights must be finite, got {weight_list}")
    return weight_list


def tied_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`~loramerge.fold.plan.TIED_MODES`."""
    if mode not in TIED_MODES:
        raise InvalidParameter(f"tied_embeddings_mode must be one of {', '.join(TIED_MODES)}, got {mode!r}")
    return mode


def fold_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The output dtype of a fold: None for ``keep``, else fp32, fp16 or bf16.

    Example:
        >>> fold_dtype("keep"), fold_dtype("bf16")
        (None, torch.bfloat16)
    """
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "keep"):
        return None
    parsed = parse_dtype(dtype)
    if parsed not in _FOLD_DTYPES.values():
        raise InvalidParameter(f"dtype must be keep, fp32, fp16 or bf16, got {dtype!r}")
    return parsed
