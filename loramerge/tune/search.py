"""The optimizer loop: optuna's ask-and-tell, a batch of candidates at a time, seeded and replayable.

The sampler is optuna's (the ``tune`` extra): CMA-ES (through the ``cmaes`` package) when every
dimension is a number and there are at least two of them, TPE otherwise (a categorical
dimension such as the method, or a single number). Both are seeded, and the first trial is the
space's start point (every weight 1, λ = 1/T: the mean of the sources), so the search starts
from the cheap baseline and never does worse on the tune rows.

Each round asks the sampler for ``batch`` points, has the pool score them (in parallel when it
has several workers) and tells the results in the order they were asked, so a run gives the
same trials whatever the workers' timing. Replaying a record (``--resume``) asks the same
points again from a sampler with the same seed and tells the recorded results instead of
evaluating them; the first point not in the record is where the run continues.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramerge.errors import InvalidParameter, MissingDependency
from loramerge.tune.evaluator import Outcome
from loramerge.tune.objective import Objective
from loramerge.tune.record import Trial
from loramerge.tune.space import SearchSpace
from loramerge.tune.workers import Pool

SAMPLERS: tuple[str, ...] = ("auto", "cmaes", "tpe", "random")
TUNE_HINT = 'pip install "loramerge[tune]"'


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependency(f"tuning needs optuna, which is not installed; install it with: {TUNE_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def sampler_name(space: SearchSpace, sampler: str = "auto") -> str:
    """The sampler ``auto`` picks for ``space`` (see the module docstring).

    Example:
        >>> from loramerge.tune.space import build_space
        >>> sampler_name(build_space("linear", 2)), sampler_name(build_space("linear", 2, "lambda"))
        ('cmaes', 'tpe')
    """
    if sampler not in SAMPLERS:
        raise InvalidParameter(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}", parameter="sampler")
    if sampler != "auto":
        return sampler
    return "cmaes" if space.continuous and len(space.dimensions) >= 2 else "tpe"


def make_sampler(space: SearchSpace, sampler: str, seed: int) -> Any:
    optuna = require_optuna()
    name = sampler_name(space, sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's experimental-feature warnings
        if name == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise MissingDependency(f"the CMA-ES sampler needs cmaes, which is not installed; install it with: "
                                        f"{TUNE_HINT}") from None
            return optuna.samplers.CmaEsSampler(x0=space.start(), seed=seed, n_startup_trials=1,
                                                warn_independent_sampling=False)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, 2 + 2 * len(
                space.dimensions)), warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=seed)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The point an optuna trial suggests in ``space`` (a method's own parameters only when it is chosen)."""
    point: dict[str, Any] = {}
    method = space.methods[0]
    for d in space.dimensions:
        if d.name == "method":
            method = point["method"] = trial.suggest_categorical("method", list(d.choices or ()))
    for d in space.dimensions:
        if d.name == "method" or (d.methods and method not in d.methods):
            continue
        if d.categorical:
            point[d.name] = trial.suggest_categorical(d.name, list(d.choices or ()))
        else:
            point[d.name] = trial.suggest_float(d.name, d.low, d.high)
    return point


@dataclass
class SearchState:
    """What the loop has done: the trials (replayed and new), and why it stopped."""

    trials: list[Trial] = field(default_factory=list)
    stopped: str = "budget"
    replayed: int = 0

    @property
    def best(self) -> Trial | None:
        done = [t for t in self.trials if t.ok]
        return max(done, key=lambda t: (t.value, -t.number)) if done else None


def run_search(space: SearchSpace, objective: Objective, pool: Pool, *, budget: int, seed: int = 0,
               sampler: str = "auto", batch: int = 1, deadline: float | None = None,
               replay: Sequence[Trial] = (), on_batch: Callable[[SearchState], None] | None = None,
               on_trial: Callable[[Trial], None] | None = None) -> SearchState:
    """Ask, score and tell up to ``budget`` trials (counting the replayed ones) in batches of ``batch``.

    ``deadline`` (a ``time.monotonic()`` value) stops before a batch that would start after it; Ctrl-C stops at once and
    drops the batch in flight (a resumed run asks for it again). ``on_batch`` is called after
    each batch (to save the record), ``on_trial`` after each trial (progress).
    """
    if budget < 1:
        raise InvalidParameter(f"the budget must be at least 1 trial, got {budget}", parameter="budget")
    if batch < 1:
        raise InvalidParameter(f"the batch must be at least 1 candidate, got {batch}", parameter="batch")
    optuna = require_optuna()
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, sampler, seed))
    study.enqueue_trial(space.start())
    state = SearchState()
    recorded = {t.number: t for t in replay if t.kind == "search"}
    round_index = 0
    try:
        while len(state.trials) < budget:
            if deadline is not None and time.monotonic() >= deadline and len(state.trials) >= len(recorded):
                state.stopped = "timeout"
                break
            count = min(batch, budget - len(state.trials))
            asked = [study.ask() for _ in range(count)]
            points = [suggest(trial, space) for trial in asked]
            todo = [i for i, trial in enumerate(asked) if trial.number not in recorded]
            outcomes: dict[int, Outcome] = {}
            if todo:
                results = pool.map([(space.candidate(points[i]), "tune") for i in todo])
                outcomes = dict(zip(todo, results))
            for i, (trial, point) in enumerate(zip(asked, points)):
                if trial.number in recorded:
                    done = recorded[trial.number]
                    _check_replay(done, point)
                    state.replayed += 1
                else:
                    done = _trial(trial.number, round_index, point, space, objective, outcomes[i])
                if done.ok:
                    study.tell(trial, done.value)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                state.trials.append(done)
                if on_trial is not None and trial.number not in recorded:
                    on_trial(done)
            round_index += 1
            if on_batch is not None:
                on_batch(state)
    except KeyboardInterrupt:
        state.stopped = "interrupted"
    return state


def _trial(number: int, batch: int, point: dict[str, Any], space: SearchSpace, objective: Objective,
           outcome: Outcome) -> Trial:
    candidate = space.candidate(point)
    trial = Trial(number, f"trial {number}", candidate, params=dict(point), batch=batch,
                  merge_seconds=outcome.merge_seconds, eval_seconds=outcome.eval_seconds)
    if outcome.scores is None:
        trial.status, trial.error = "failed", outcome.error
        return trial
    values = objective.values(outcome.scores)
    trial.scores = {task: s.to_dict() for task, s in outcome.scores.items()}
    trial.values = objective.normalized(values)
    trial.value = objective.value(values, candidate.weights)
    if not math.isfinite(trial.value):
        trial.status, trial.error = "failed", "the objective is not a finite number"
    return trial


def _check_replay(recorded: Trial, point: dict[str, Any]) -> None:
    same = recorded.params.keys() == point.keys() and all(
        _close(recorded.params[k], point[k]) for k in point)
    if not same:
        raise InvalidParameter(f"trial {recorded.number} of the record does not replay: the optimizer now proposes "
                               f"{point}, the record has {recorded.params} (recorded with other settings or another "
                               "optuna version?)", parameter="resume")


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b
