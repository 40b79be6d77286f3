"""Tuning merges on data: search λ, the weights, method parameters and the method on a validation split.

optuna (the ``tune`` extra) proposes candidates; each is scored on a resident base model (the
runtime layer); the holdout rows compare the best with honest baselines at the end.
"""

from loramerge.tune.objective import Objective, task_value
from loramerge.tune.record import Trial
from loramerge.tune.result import Baseline, Scored, TuneResult
from loramerge.tune.run import parse_duration, tune
from loramerge.tune.space import Candidate, Dimension, SearchSpace, build_space
from loramerge.tune.splits import split_task, split_tasks

__all__ = [
    "Baseline",
    "Candidate",
    "Dimension",
    "Objective",
    "Scored",
    "SearchSpace",
    "Trial",
    "TuneResult",
    "build_space",
    "parse_duration",
    "split_task",
    "split_tasks",
    "task_value",
    "tune",
]
