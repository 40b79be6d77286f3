"""What a tuning run maximizes: per-task values from evaluation scores, normalized, aggregated, penalized.

- A task's **value** is its accuracy where the rows define one (completions, chats, multiple
  choice), else the negative token loss (text rows); a user's scoring function's value as it is
  (higher is better). ``metric="loss"`` uses the negative loss everywhere, ``"token_accuracy"``
  the fraction of completion tokens that are the argmax (partial credit on long completions).
- **Normalized** by the task's own adapter when tasks are paired with sources (the merging
  papers' normalized score): value ÷ own value for accuracies and custom values, own loss ÷ loss
  for losses, so that 1.0 means "as good as the task's own adapter". A task whose own adapter
  scores 0 (or less) cannot be normalized and counts with its raw value.
- **Aggregated** over the tasks: ``mean`` or ``min`` (the worst task).
- **Penalized**, optionally, by ``l1`` × the mean absolute weight, as LoraHub does (0.05 there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from loramerge.errors import InvalidParameter
from loramerge.runtime.scoring import TaskScore

Metric = Literal["score", "loss", "token_accuracy"]
METRICS: tuple[str, ...] = ("score", "loss", "token_accuracy")
AGGREGATES: tuple[str, ...] = ("mean", "min")


def task_value(score: TaskScore, metric: Metric = "score") -> float:
    """The value of one task's score under ``metric`` (higher is better).

    Example:
        >>> s = TaskScore("add", "completion", 4, tokens=8, loss=0.5, accuracy=0.75, token_accuracy=0.875)
        >>> task_value(s), task_value(s, "loss"), task_value(s, "token_accuracy")
        (0.75, -0.5, 0.875)
    """
    if score.kind == "custom":
        return float(score.value if score.value is not None else math.nan)
    if metric == "loss" or (metric == "score" and score.accuracy is None):
        return -float(score.loss) if score.loss is not None else math.nan
    if metric == "token_accuracy" and score.token_accuracy is not None:
        return float(score.token_accuracy)
    return float(score.accuracy) if score.accuracy is not None else -float(score.loss or math.nan)


@dataclass(frozen=True)
class Objective:
    """How per-task scores become one number to maximize (see the module docstring).

    ``own`` maps a task to its own adapter's value on the same rows (paired tasks only).

    Example:
        >>> obj = Objective("mean", own={"a": 0.5, "b": 1.0})
        >>> obj.normalized({"a": 0.25, "b": 1.0})
        {'a': 0.5, 'b': 1.0}
        >>> obj.value({"a": 0.25, "b": 1.0}), Objective("min").value({"a": 0.25, "b": 1.0})
        (0.75, 0.25)
        >>> Objective("mean", l1=0.1).value({"a": 1.0}, weights=[0.5, -1.5])
        0.9
    """

    aggregate: str = "mean"
    metric: Metric = "score"
    l1: float = 0.0
    own: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise InvalidParameter(f"unknown objective {self.aggregate!r}; use one of {', '.join(AGGREGATES)}",
                                   parameter="objective")
        if self.metric not in METRICS:
            raise InvalidParameter(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}",
                                   parameter="metric")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise InvalidParameter(f"the L1 penalty must be a number ≥ 0, got {self.l1}", parameter="l1")

    def with_own(self, own: Mapping[str, float]) -> Objective:
        return Objective(self.aggregate, self.metric, self.l1, dict(own))

    def values(self, scores: Mapping[str, TaskScore]) -> dict[str, float]:
        return {task: task_value(score, self.metric) for task, score in scores.items()}

    def normalized(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each task's value relative to its own adapter's (where paired and defined), else as it is."""
        out = {}
        for task, value in values.items():
            own = self.own.get(task)
            if own is None or not math.isfinite(own):
                out[task] = value
            elif own < 0:  # a negative loss: own loss ÷ loss
                out[task] = own / value if value < 0 else -math.inf
            elif own > 0:
                out[task] = value / own
            else:
                out[task] = value
        return out

    def value(self, values: Mapping[str, float], weights: Sequence[float] = ()) -> float:
        """The objective of per-task values (already :meth:`values`), with the L1 penalty on ``weights``."""
        if not values:
            return math.nan
        normalized = list(self.normalized(values).values())
        if any(math.isnan(v) for v in normalized):
            return math.nan
        total = min(normalized) if self.aggregate == "min" else sum(normalized) / len(normalized)
        if self.l1 and weights:
            total -= self.l1 * sum(abs(w) for w in weights) / len(weights)
        return total
