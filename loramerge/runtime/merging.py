"""``merge`` with data: the merge engine, plus the statistics that data-aware methods need.

The merge engine (layer 3) never runs a model. This wrapper, one layer up, collects the input
Grams of a data-aware method (``regmean``) with the runtime, from ``model`` and one data set per
source, then hands them to the engine; for every other method it is the engine's ``merge``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter
from loramerge.errors import InvalidParameter
from loramerge.io.sources import load
from loramerge.merge.engine import merge as merge_adapters
from loramerge.merge.methods import get_method
from loramerge.merge.statistics import InputStatistics
from loramerge.runtime.data import DataSpec
from loramerge.runtime.resident import Runtime
from loramerge.runtime.statistics import input_statistics


def merge(
    adapters: Sequence[Adapter | str | Path],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    model: str | Path | Runtime | None = None,
    data: Sequence[DataSpec] | None = None,
    stats: str | Path | None = None,
    statistics: InputStatistics | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    model_dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "auto",
    progress: bool = False,
    **kwargs: Any,
) -> Adapter:
    """Merge LoRA adapters into one (see :func:`loramerge.merge.engine.merge` for the options).

    A data-aware method (``regmean``) also needs ``model`` (the base model folder or Hub id, or a
    resident :class:`~loramerge.runtime.resident.Runtime`) and
    ``data`` (one task per source, in order: a JSONL file or ``NAME=FILE``), from which the
    input statistics are collected, or the ``statistics`` themselves. ``stats`` is a folder that
    caches them, so a second merge on the same inputs does not run the model. ``limit`` keeps the
    first rows of each data file; ``model_dtype`` loads the model in another dtype.

    Example:
        >>> import torch
        >>> from loramerge.core.adapter import LowRank
        >>> from loramerge.merge.statistics import InputStatistics
        >>> a = Adapter({"fc": LowRank(torch.eye(2)[:1], torch.eye(2)[:, :1])})
        >>> b = Adapter({"fc": LowRank(torch.eye(2)[1:], torch.eye(2)[:, 1:])})
        >>> grams = InputStatistics([{"fc": torch.diag(torch.tensor([3.0, 1.0]))}, {"fc": torch.eye(2)}])
        >>> merged = merge([a, b], method="regmean", statistics=grams, off_diagonal=1.0)
        >>> [round(v, 4) for v in torch.diagonal(merged.delta("fc")).tolist()]
        [0.75, 0.5]
    """
    spec = get_method(method)
    sources: Sequence[Adapter | str | Path] = adapters
    if spec.needs_statistics and statistics is None:
        if model is None or not data:
            raise InvalidParameter(
                f"method {spec.name!r} needs data: give the base model and one data file per source "
                "(--model BASE --data a.jsonl --data b.jsonl; in Python, model= and data=)"
            )
        sources = [a if isinstance(a, Adapter) else load(a) for a in adapters]
        statistics = input_statistics(model, sources, list(data), cache=stats, limit=limit, batch_size=batch_size,
                                      device=device, dtype=model_dtype, allow_pickle=allow_pickle, progress=progress)
    elif not spec.needs_statistics and (model is not None or data):
        raise InvalidParameter(f"method {spec.name!r} does not use data; --model and --data are for data-aware "
                               "methods (regmean)")
    return merge_adapters(sources, method, weights, rank, device=device, progress=progress, statistics=statistics,
                          **kwargs)
