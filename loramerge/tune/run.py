"""``tune``: search merge weights, λ and method parameters on a validation split, with honest baselines.

The run, in order:

1. Every option is checked (search space, bounds, budget, objective) before anything is loaded.
2. The sources and the data are read; each task is split, seeded, into tune and holdout rows.
3. The workers start, each with the base model resident.
4. Baselines on the tune rows: the base model, each source alone (the own-adapter scores that
   normalize paired tasks), ``linear`` with weights 1, and ``linear`` with one λ for every
   weight on a grid (the cheap 1-D search).
5. The search (:mod:`loramerge.tune.search`), until the budget, the timeout or Ctrl-C.
6. The holdout rows score, once, every baseline and the search's best. If the search's best
   does not beat both ``linear`` baselines there, the better of those is chosen instead.
7. The chosen merge is computed by the merge engine, as ``combine`` and recipes compute it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loramerge.core.adapter import Adapter
from loramerge.core.devices import one_core_spare
from loramerge.errors import InvalidParameter
from loramerge.io.sources import load
from loramerge.merge.engine import merge as merge_adapters
from loramerge.merge.methods import get_method
from loramerge.merge.statistics import InputStatistics
from loramerge.runtime.data import DataSpec, Task, load_tasks
from loramerge.runtime.resident import Mode, Runtime
from loramerge.runtime.scoring import ScoreFunction
from loramerge.runtime.statistics import input_statistics
from loramerge.tune.evaluator import EvaluatorSpec, Outcome
from loramerge.tune.objective import Metric, Objective
from loramerge.tune.record import Trial, check_resumable, read_record, write_record
from loramerge.tune.result import CHEAP_LABELS, SEARCH_LABEL, Baseline, TuneResult, scored
from loramerge.tune.search import SearchState, run_search, sampler_name
from loramerge.tune.space import Candidate, SearchSpace, build_space
from loramerge.tune.splits import split_tasks
from loramerge.tune.workers import Pool, make_pool

BASE_LABEL = "base"
SUM_LABEL, LAMBDA_LABEL = CHEAP_LABELS
LAMBDA_STEPS = 10
# The batch size that combine and recipes collect statistics with: the same batches give the same
# Grams bit for bit, so the recipe written beside a tuned regmean merge reproduces it exactly.
STATISTICS_BATCH = 8


def tune(
    base: str | Path | Runtime | nn.Module,
    sources: Sequence[Adapter | str | Path],
    data: DataSpec | Sequence[DataSpec] | Mapping[str, Any],
    *,
    method: str | Sequence[str] = "linear",
    search: str | Sequence[str] | None = None,
    budget: int = 50,
    bounds: str | Sequence[str] | Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    holdout: float = 0.3,
    objective: str = "mean",
    metric: Metric = "score",
    l1: float = 0.0,
    paired: bool = False,
    seed: int = 0,
    sampler: str = "auto",
    workers: int = 1,
    ray: str | None = None,
    batch: int | None = None,
    timeout: float | str | None = None,
    resume: str | Path | None = None,
    record: str | Path | None = None,
    score: ScoreFunction | None = None,
    lambda_steps: int = LAMBDA_STEPS,
    fallback: bool = True,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | None = None,
    mode: Mode = "patch",
    tokenizer: Any = None,
    allow_pickle: bool = False,
    progress: bool = False,
) -> TuneResult:
    """Search the merge of ``sources`` that scores best on ``data``, on a resident ``base`` model.

    ``method`` is a method name or a list (then the method is searched too); ``search`` names the
    dimensions (default λ and one weight per source; see :mod:`loramerge.tune.space`) and
    ``bounds`` overrides their ranges (``"lambda=0:1,density=0.1:0.9"``); ``params`` fixes method
    parameters that are not searched. ``budget`` is the number of search trials, ``timeout``
    (seconds, or ``"30m"``, counted from the call) a limit in time: no batch of trials starts after it. ``holdout`` is the fraction of each task's rows kept
    for the final comparison. ``objective`` is ``mean`` or ``min`` over tasks of the ``metric``
    (see :mod:`loramerge.tune.objective`), normalized by each task's own adapter when ``paired``
    (task i belongs to source i), minus ``l1`` × the mean absolute weight. ``score(model, rows)``
    replaces the built-in metrics, as in :func:`loramerge.evaluate`.

    ``base`` is a model folder or Hub id (loaded once), a :class:`Runtime`, or a torch module
    (then give ``tokenizer``, or a ``score`` function).

    ``workers`` evaluates that many candidates at once (processes, one per GPU where there are
    several); ``ray`` sends them to the Ray cluster at that address instead. ``batch`` is the
    number of candidates asked of the optimizer at a time (default: the number of workers); the
    result depends on it, not on the workers' timing. ``record`` writes ``tune.json`` after every
    batch; ``resume`` continues from one. ``fallback=False`` keeps the search's best even when a
    cheap baseline scores better on the holdout rows (the report still says so).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from loramerge.core.adapter import LowRank
        >>> net = nn.Sequential()
        >>> net.add_module("fc", nn.Linear(1, 1, bias=False))
        >>> _ = nn.init.zeros_(net.fc.weight)
        >>> up = Adapter({"fc": LowRank(torch.ones(1, 1), torch.ones(1, 1))}, source="up")
        >>> rows = {"target": [{"x": 0.6}]}  # score: how close the output is to 0.6
        >>> closeness = lambda model, rows: -abs(float(model(torch.tensor([[1.0]]))) - 0.6)
        >>> result = tune(net, [up], {"a": [{"x": 1}] * 4}, search="lambda", budget=12, score=closeness)
        >>> round(result.candidate.weights[0], 1)
        0.6
    """
    started = time.perf_counter()
    clock = time.monotonic()
    # Everything that can be refused without loading anything is refused first.
    if budget < 1:
        raise InvalidParameter(f"the budget must be at least 1 trial, got {budget}", parameter="budget")
    seconds = parse_duration(timeout)
    goal = Objective(objective, metric, l1)
    if lambda_steps < 1:
        raise InvalidParameter(f"lambda_steps must be at least 1, got {lambda_steps}", parameter="lambda_steps")
    space = build_space(method, len(sources), search, bounds, fixed=params)
    methods = [get_method(m) for m in space.methods]
    if not 0.0 < holdout < 1.0:
        raise InvalidParameter(f"--holdout must be a fraction between 0 and 1 (exclusive), got {holdout}",
                               parameter="holdout")
    needs_statistics = any(m.needs_statistics for m in methods)
    if needs_statistics and not paired:
        raise InvalidParameter("regmean needs one data set per source: pair the tasks with the sources (--paired)",
                               parameter="paired")
    if isinstance(base, nn.Module):
        base = Runtime(base, tokenizer, mode=mode)
    if (workers > 1 or ray) and isinstance(base, Runtime):
        raise InvalidParameter("worker processes and Ray actors load the base model themselves: give it as a folder "
                               "or Hub id", parameter="workers")

    adapters = [a if isinstance(a, Adapter) else load(a, allow_pickle=allow_pickle) for a in sources]
    tasks = load_tasks(data, limit=limit, validate=score is None)
    if not tasks:
        raise InvalidParameter("no data to tune on: give at least one task", parameter="data")
    if paired and len(tasks) != len(adapters):
        raise InvalidParameter(f"--paired needs one data file per source, in the sources' order: {len(tasks)} task(s) "
                               f"({', '.join(t.name for t in tasks)}) for {len(adapters)} source(s)",
                               parameter="paired")
    tune_tasks, held_tasks = split_tasks(tasks, holdout, seed)
    steps = lambda_grid(space, len(adapters), lambda_steps)
    settings = _settings(space, adapters, tasks, sampler, seed, holdout, goal, paired, steps, batch or max(workers, 1))
    replay: list[Trial] = []
    if resume is not None:
        previous = read_record(resume)
        check_resumable(resume, previous["settings"], settings)
        replay = [Trial.from_dict(t) for t in previous.get("trials", []) if t.get("kind", "search") == "search"]

    statistics: InputStatistics | None = None
    runtime = base if isinstance(base, Runtime) else None
    if runtime is None and workers == 1 and not ray:
        runtime = Runtime.load(base, device=device, dtype=dtype, mode=mode, allow_pickle=allow_pickle)
    if needs_statistics:
        statistics = input_statistics(runtime if runtime is not None else base, adapters, tune_tasks,
                                      batch_size=STATISTICS_BATCH, device=device, dtype=dtype,
                                      allow_pickle=allow_pickle, progress=progress)
    spec = EvaluatorSpec(base=None if isinstance(base, Runtime) else str(base),
                         sources=list(sources) if all(isinstance(s, (str, Path)) for s in sources) else adapters,
                         tasks={"tune": tune_tasks, "holdout": held_tasks}, device=str(device), dtype=dtype,
                         mode=mode, allow_pickle=allow_pickle, batch_size=batch_size, score=score, seed=seed,
                         statistics=statistics)
    pool = make_pool(spec, workers=workers, ray=ray, runtime=runtime)
    # Many small forward passes: with every core in torch's pool, any other thread stalls them all.
    spare = one_core_spare() if runtime is not None and runtime.device.type == "cpu" else contextlib.nullcontext()
    try:
        with spare:
            return _tune(pool, space, goal, adapters, tasks, steps, settings, replay, budget=budget, seed=seed,
                         sampler=sampler, batch=batch or pool.size, record=record,
                         deadline=None if seconds is None else clock + seconds,
                         statistics=statistics, statistics_tasks=tune_tasks, fallback=fallback,
                         device=runtime.device if runtime is not None else device,
                         progress=progress, started=started)
    finally:
        pool.close()


def _tune(pool: Pool, space: SearchSpace, goal: Objective, adapters: list[Adapter], tasks: list[Task],
          steps: list[float], settings: dict[str, Any], replay: list[Trial], *, budget: int, seed: int,
          sampler: str, batch: int, deadline: float | None, record: str | Path | None,
          statistics: InputStatistics | None, statistics_tasks: list[Task], fallback: bool,
          device: str | torch.device,
          progress: bool,
          started: float) -> TuneResult:
    count = len(adapters)
    names = [a.name for a in adapters]
    paired = bool(settings["paired"])
    ones = tuple([1.0] * count)
    references: dict[str, Candidate | None] = {BASE_LABEL: None}
    for i, name in enumerate(_unique(names)):
        references[name] = Candidate("linear", tuple(1.0 if j == i else 0.0 for j in range(count)))
    references[SUM_LABEL] = Candidate("linear", ones)
    grid = {f"λ={s:.4g}": Candidate("linear", tuple([s] * count)) for s in steps}

    # Baselines on the tune rows; the sources alone give the own-adapter values of paired tasks.
    jobs = [(c, "tune") for c in [*references.values(), *grid.values()]]
    outcomes = dict(zip([*references, *grid], pool.map(jobs)))
    own_labels = list(references)[1:count + 1]
    goal_tune = goal.with_own(_own(goal, outcomes, own_labels, tasks) if paired else {})
    baselines = {label: Baseline(label, c, tune=_scored(goal_tune, outcomes[label], c)) for label, c in
                 references.items()}
    grid_scores = {label: _scored(goal_tune, outcomes[label], c) for label, c in grid.items()}
    best_grid = max(grid_scores, key=lambda k: _rank(grid_scores[k]))
    baselines[LAMBDA_LABEL] = Baseline(f"{LAMBDA_LABEL} ({best_grid})", grid[best_grid], tune=grid_scores[best_grid])

    document: dict[str, Any] = {"settings": settings}
    bar = tqdm(total=budget, initial=0, desc="tune", unit="trial", disable=None if progress else True, leave=False)

    def on_trial(trial: Trial) -> None:
        bar.update(1)
        if trial.ok:
            bar.set_postfix_str(f"last {trial.value:.4f}")

    def on_batch(state: SearchState) -> None:
        if record is not None:
            write_record(record, {**document, "stopped": "running", "trials": [t.to_dict() for t in state.trials]})

    with bar:
        state = run_search(space, goal_tune, pool, budget=budget, seed=seed, sampler=sampler, batch=batch,
                           deadline=deadline, replay=replay, on_batch=on_batch, on_trial=on_trial)
    best = state.best
    notes: list[str] = []
    if best is None:
        notes.append("every search trial failed; the cheap baselines are all there is")
    if state.replayed:
        notes.append(f"{state.replayed} trial(s) replayed from the record")

    # The holdout rows, once: every baseline and the search's best.
    finals: dict[str, Candidate | None] = {label: b.candidate for label, b in baselines.items()}
    if best is not None:
        finals[SEARCH_LABEL] = best.candidate
    held = dict(zip(finals, pool.map([(c, "holdout") for c in finals.values()])))
    goal_held = goal.with_own(_own(goal, held, own_labels, tasks) if paired else {})
    for label, candidate in finals.items():
        if label == SEARCH_LABEL:
            assert best is not None and best.value is not None
            baselines[SEARCH_LABEL] = Baseline(SEARCH_LABEL, candidate, tune=scored(best.task_scores(), best.values,
                                                                                    best.value))
        baselines[label].holdout = _scored(goal_held, held[label], candidate)

    chosen = max(CHEAP_LABELS, key=lambda k: _rank(baselines[k].holdout))
    if best is not None and (not fallback or _rank(baselines[SEARCH_LABEL].holdout) >= _rank(baselines[chosen].holdout)):
        chosen = SEARCH_LABEL
    if best is None:
        baselines[SEARCH_LABEL] = Baseline(SEARCH_LABEL, None)
    candidate = baselines[chosen].candidate
    assert candidate is not None
    merged = merge_adapters(adapters, candidate.method, list(candidate.weights), seed=seed, device=device,
                            statistics=statistics if get_method(candidate.method).needs_statistics else None,
                            **dict(candidate.params))
    result = TuneResult(merged, candidate, chosen, state.trials, baselines, settings, state.stopped,
                        time.perf_counter() - started, notes)
    if get_method(candidate.method).needs_statistics:
        result.statistics_rows = {t.name: [dict(r.data) for r in t.rows] for t in statistics_tasks}
    if record is not None:
        result.write_json(record)
    return result


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _own(goal: Objective, outcomes: Mapping[str, Outcome], own_labels: list[str], tasks: list[Task]) -> dict[str, float]:
    own = {}
    for task, label in zip(tasks, own_labels):
        scores = outcomes[label].scores
        if scores is not None:
            own[task.name] = goal.values(scores)[task.name]
    return own


def _scored(goal: Objective, outcome: Outcome, candidate: Candidate | None):
    if outcome.scores is None:
        return None
    values = goal.values(outcome.scores)
    return scored(outcome.scores, goal.normalized(values), goal.value(values, candidate.weights if candidate else ()))


def _rank(figures) -> float:
    value = figures.objective if figures is not None else math.nan
    return value if math.isfinite(value) else -math.inf


def lambda_grid(space: SearchSpace, sources: int, steps: int = LAMBDA_STEPS) -> list[float]:
    """The λ values of the cheap baseline: ``steps`` evenly spaced in λ's bounds (0 left out), and 1/T.

    Example:
        >>> from loramerge.tune.space import build_space
        >>> lambda_grid(build_space("linear", 4), 4, 4)
        [0.25, 0.5, 1.0, 1.5, 2.0]
    """
    dim = next((d for d in space.dimensions if d.name == "lambda"), None)
    low, high = (dim.low, dim.high) if dim is not None else (0.0, 2.0)
    values = {round(low + (high - low) * (i + 1) / steps, 10) for i in range(steps)}
    if low < 1.0 / sources <= high:
        values.add(round(1.0 / sources, 10))
    return sorted(v for v in values if v != 0.0)


def parse_duration(value: float | str | None) -> float | None:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"1h30m"``; None stays None.

    Example:
        >>> parse_duration("1h30m"), parse_duration("45s"), parse_duration(12)
        (5400.0, 45.0, 12.0)
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        total = float(value)
    else:
        text, total, number = value.strip().lower(), 0.0, ""
        units = {"h": 3600.0, "m": 60.0, "s": 1.0}
        try:
            for char in text:
                if char.isdigit() or char == ".":
                    number += char
                elif char in units and number:
                    total += float(number) * units[char]
                    number = ""
                else:
                    raise ValueError(char)
            if number:
                total += float(number)
        except ValueError:
            raise InvalidParameter(f"--timeout {value!r}: give seconds or a duration like 90s, 30m, 1h30m",
                                   parameter="timeout") from None
    if not (math.isfinite(total) and total > 0):
        raise InvalidParameter(f"--timeout must be a positive duration, got {value!r}", parameter="timeout")
    return total


def _settings(space: SearchSpace, adapters: list[Adapter], tasks: list[Task], sampler: str, seed: int,
              holdout: float, goal: Objective, paired: bool, steps: list[float], batch: int) -> dict[str, Any]:
    """What a record must share with a run that resumes it."""
    return {
        "sources": [a.source or a.name for a in adapters],
        "tasks": {t.name: {"rows": len(t.rows), "sha256": _rows_hash(t)} for t in tasks},
        "methods": list(space.methods),
        "dimensions": [[d.name, d.low, d.high, list(d.choices) if d.choices else None] for d in space.dimensions],
        "fixed": dict(space.fixed),
        "sampler": sampler_name(space, sampler),
        "seed": seed, "batch": batch, "holdout": holdout, "paired": paired,
        "objective": goal.aggregate, "metric": goal.metric, "l1": goal.l1, "lambda_grid": steps,
    }


def _rows_hash(task: Task) -> str:
    digest = hashlib.sha256()
    for row in task.rows:
        digest.update(json.dumps(dict(row.data), sort_keys=True).encode())
    return digest.hexdigest()[:16]
