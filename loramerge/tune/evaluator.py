"""One trial's work, on a resident base model: merge (or rescale), swap in, score the tune rows.

A :class:`TrialEvaluator` lives as long as the search, in the main process, in each worker
process, or in each Ray actor. It holds:

- the base model, loaded once (a :class:`~loramerge.runtime.resident.Runtime`);
- the sources, loaded once, and on a GPU moved there once;
- the tasks, tokenized once (the encoding is cached on each task);
- for the methods whose result is linear in the weights (``linear``, ``cat``,
  ``task_arithmetic``; ``regmean`` given its statistics), the per-source updates: a trial of those
  methods is the runtime's weighted sum of cached updates (one pass over the adapted weights), never
  a merge. ``regmean``'s per-source updates ``Bᵢ·(sᵢ Aᵢ G̃ᵢ (Σⱼ G̃ⱼ)⁻¹)`` are merges with one-hot
  weights, computed once per ``off_diagonal`` value;
- for every other method, a real merge per trial, on the model's device (the GPU when there is one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter
from loramerge.errors import InvalidParameter, LoramergeError, NonFiniteValues
from loramerge.io.sources import load
from loramerge.merge.engine import merge as merge_adapters
from loramerge.merge.methods import get_method
from loramerge.merge.statistics import InputStatistics
from loramerge.runtime.data import Task
from loramerge.runtime.encoding import encode_task
from loramerge.runtime.resident import Mode, Runtime
from loramerge.runtime.scoring import ScoreFunction, TaskScore
from loramerge.tune.space import LINEAR_IN_WEIGHTS, Candidate

# On a GPU, sequences per batch are sized to the free memory; these bound the result.
MIN_GPU_BATCH, MAX_GPU_BATCH = 8, 512
CPU_BATCH = 32


@dataclass
class EvaluatorSpec:
    """Everything a worker needs to build its own :class:`TrialEvaluator` (picklable, for processes and Ray).

    ``base`` is a model folder or Hub id; ``sources`` paths or :class:`Adapter` objects; ``tasks``
    maps a split name (``tune``, ``holdout``) to its tasks. ``batch_size=None`` sizes batches to
    the device. ``threads`` sets torch's CPU threads in the worker.
    """

    base: str | Path | None
    sources: list[Any]
    tasks: dict[str, list[Task]]
    device: str = "auto"
    dtype: str | None = None
    mode: Mode = "patch"
    allow_pickle: bool = False
    batch_size: int | None = None
    score: ScoreFunction | None = None
    seed: int = 0
    statistics: InputStatistics | None = None
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """The scores of one candidate on one split, or why it failed; ``seconds`` splits merge and evaluation."""

    scores: dict[str, TaskScore] | None
    error: str | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.scores is not None


class TrialEvaluator:
    """Scores candidates (see the module docstring); ``runtime`` reuses a model already in memory."""

    def __init__(self, spec: EvaluatorSpec, runtime: Runtime | None = None) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        if runtime is None:
            if spec.base is None:
                raise InvalidParameter("no base model to evaluate on")
            runtime = Runtime.load(spec.base, device=spec.device, dtype=spec.dtype, mode=spec.mode,
                                   allow_pickle=spec.allow_pickle)
        self.runtime = runtime
        self.spec = spec
        device = runtime.device
        loaded = [s if isinstance(s, Adapter) else load(s, allow_pickle=spec.allow_pickle) for s in spec.sources]
        # On an accelerator the factors move there once, not once per trial.
        self.sources = [_moved(a, device) for a in loaded] if device.type != "cpu" else loaded
        for adapter in self.sources:  # every refusal (unmatched module, shapes) before the first trial
            runtime.placements(adapter)
        self.tasks = spec.tasks
        self.statistics = spec.statistics
        self._bases: dict[tuple[Any, ...], list[Adapter]] = {}
        if spec.score is None:
            for tasks in self.tasks.values():
                for task in tasks:
                    encode_task(task, runtime.tokenizer, runtime.context_length())
        self.batch_size = spec.batch_size or auto_batch_size(runtime, [t for ts in self.tasks.values() for t in ts],
                                                             spec.score is not None)

    # ------------------------------------------------------------------------------ scoring

    def evaluate(self, candidate: Candidate | None, split: str = "tune") -> Outcome:
        """Scores of ``candidate`` (None: the base model) on ``split``; a failure is an :class:`Outcome` with an error."""
        started = time.perf_counter()
        try:
            self.apply(candidate)
        except (LoramergeError, torch.linalg.LinAlgError, RuntimeError) as exc:
            self.runtime.restore()
            return Outcome(None, _one_line(exc), time.perf_counter() - started)
        merged = time.perf_counter()
        try:
            scores = self.runtime.evaluate(self.tasks[split], batch_size=self.batch_size, score=self.spec.score)
        except LoramergeError:
            raise
        except (RuntimeError, ValueError) as exc:  # a user's scoring function, or NaN-driven failures
            return Outcome(None, _one_line(exc), merged - started, time.perf_counter() - merged)
        finally:
            self.runtime.restore()
        done = time.perf_counter()
        bad = [name for name, s in scores.items() if not _finite_score(s)]
        if bad:
            return Outcome(None, f"non-finite score on task(s) {', '.join(bad)} (NaN or Inf in the merged model)",
                           merged - started, done - merged)
        return Outcome(scores, None, merged - started, done - merged)

    def apply(self, candidate: Candidate | None) -> None:
        """Put ``candidate``'s merge on the model (None: the base model)."""
        if candidate is None:
            self.runtime.restore()
            return
        spec = get_method(candidate.method)
        weights = list(candidate.weights)
        if not all(math.isfinite(w) for w in weights):
            raise NonFiniteValues(f"candidate {candidate.describe()}: a weight is not finite")
        if spec.name in LINEAR_IN_WEIGHTS:
            updates, scale = self._updates(candidate)
            self.runtime.apply(updates, [w * scale for w in weights])
        else:
            self.runtime.apply(self.merged(candidate))

    def merged(self, candidate: Candidate, *, device: str | torch.device | None = None) -> Adapter:
        """The real merge of ``candidate`` by the merge engine (what ``combine`` and recipes compute)."""
        spec = get_method(candidate.method)
        return merge_adapters(self.sources, spec.name, list(candidate.weights), seed=self.spec.seed,
                              device=device or self.runtime.device,
                              statistics=self.statistics if spec.needs_statistics else None, **dict(candidate.params))

    def _updates(self, candidate: Candidate) -> tuple[list[Adapter], float]:
        """Per-source updates whose weighted sum is the candidate's merge, and a global scale."""
        spec = get_method(candidate.method)
        params = spec.resolve(dict(candidate.params), sources=len(self.sources))
        scale = float(params.get("lambda_", 1.0))
        if not spec.needs_statistics:
            return self.sources, scale
        key = (spec.name, *sorted((k, str(v)) for k, v in params.items()))
        cached = self._bases.get(key)
        if cached is None:
            if self.statistics is None:
                raise InvalidParameter(f"method {spec.name!r} needs input statistics; tune it with tasks paired "
                                       "with the sources")
            count = len(self.sources)
            cached = [merge_adapters(self.sources, spec.name, [1.0 if j == i else 0.0 for j in range(count)],
                                     seed=self.spec.seed, device=self.runtime.device, statistics=self.statistics,
                                     **dict(candidate.params))
                      for i in range(count)]
            self._bases[key] = cached
        return cached, scale


def _moved(adapter: Adapter, device: torch.device) -> Adapter:
    return adapter.with_layers({m: lr.to(device=device) for m, lr in adapter.layers.items()})


def _finite_score(score: TaskScore) -> bool:
    values = [score.loss, score.accuracy, score.value]
    return all(v is None or math.isfinite(v) for v in values)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def auto_batch_size(runtime: Runtime, tasks: Sequence[Task], custom: bool = False) -> int:
    """Sequences per forward pass for this device: on a GPU as many as about half its free memory holds
    (logits in float32 and their log-softmax, plus activations), on the CPU a fixed :data:`CPU_BATCH`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> auto_batch_size(Runtime(nn.Linear(2, 2)), [])
        32
    """
    if runtime.device.type != "cuda" or custom:
        return CPU_BATCH
    try:
        free, _ = torch.cuda.mem_get_info(runtime.device)
    except RuntimeError:
        return MIN_GPU_BATCH
    config = runtime.config
    vocab = int(config.get("vocab_size") or 32000)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 4096)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 32)
    longest = 1
    for task in tasks:
        for item in task.cache.get(("encoded", id(runtime.tokenizer), runtime.context_length()), []):
            longest = max(longest, len(item.ids))
    per_sequence = longest * (vocab * 4 * 3 + hidden * 2 * 16 + hidden * layers * 2)
    return int(max(MIN_GPU_BATCH, min(MAX_GPU_BATCH, (free // 2) // max(per_sequence, 1))))
