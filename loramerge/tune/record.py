"""The record of a tuning run (``tune.json``): its settings and every trial, written after each batch.

A trial records the optimizer's point, the merge it stands for, each task's scores on the tune
rows, the objective, how long the merge and the evaluation took, and whether it completed or
failed (with the error). ``--resume tune.json`` replays the recorded trials into a new optimizer
with the same seed and settings, and continues where the run stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.core.report import json_safe
from loramerge.errors import CorruptFile, InvalidParameter, SourceNotFound
from loramerge.io.output import atomic_output
from loramerge.runtime.scoring import TaskScore
from loramerge.tune.space import Candidate

RECORD_VERSION = 1


@dataclass
class Trial:
    """One evaluated candidate.

    ``kind`` is ``search`` (a point the optimizer asked for) or ``baseline``; ``batch`` the
    optimizer batch it was asked in; ``value`` the objective on the tune rows (None when it
    failed); ``scores`` each task's figures (:class:`TaskScore` as a dict) and ``values`` the
    per-task values the objective aggregated (normalized where paired).
    """

    number: int
    label: str
    candidate: Candidate | None
    status: str = "complete"
    value: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    kind: str = "search"
    batch: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete" and self.value is not None and math.isfinite(self.value)

    @property
    def seconds(self) -> float:
        return self.merge_seconds + self.eval_seconds

    def task_scores(self) -> dict[str, TaskScore]:
        return {task: score_from_dict(data) for task, data in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number, "kind": self.kind, "label": self.label, "batch": self.batch,
            "status": self.status, "value": self.value, "params": self.params,
            "candidate": self.candidate.to_dict() if self.candidate is not None else None,
            "scores": self.scores, "values": self.values,
            "seconds": {"merge": self.merge_seconds, "eval": self.eval_seconds, "total": self.seconds},
            **({"error": self.error} if self.error else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        seconds = data.get("seconds") or {}
        candidate = data.get("candidate")
        return cls(
            number=int(data["number"]), label=str(data.get("label", "")),
            candidate=Candidate.from_dict(candidate) if candidate else None,
            status=str(data.get("status", "complete")), value=data.get("value"),
            params=dict(data.get("params") or {}), scores=dict(data.get("scores") or {}),
            values=dict(data.get("values") or {}), kind=str(data.get("kind", "search")), batch=int(data.get("batch", 0)),
            merge_seconds=float(seconds.get("merge", 0.0)), eval_seconds=float(seconds.get("eval", 0.0)),
            error=data.get("error"),
        )


def score_from_dict(data: Mapping[str, Any]) -> TaskScore:
    """A :class:`TaskScore` back from its ``to_dict()``.

    Example:
        >>> s = TaskScore("t", "completion", 2, tokens=4, loss=0.5, accuracy=1.0, token_accuracy=1.0)
        >>> score_from_dict(s.to_dict()) == s
        True
    """
    return TaskScore(str(data["task"]), data["kind"], int(data["rows"]), int(data.get("tokens", 0)),
                     data.get("loss"), data.get("accuracy"), data.get("token_accuracy"), data.get("value"))


def write_record(path: str | Path, document: Mapping[str, Any]) -> Path:
    """Write ``tune.json`` atomically (replacing the previous version: it is rewritten after every batch)."""
    with atomic_output(path, force=True, directory=False) as tmp:
        tmp.write_text(json.dumps(json_safe({"version": RECORD_VERSION, **document}), indent=2) + "\n",
                       encoding="utf-8")
    return Path(path)


def read_record(path: str | Path) -> dict[str, Any]:
    """A ``tune.json`` written by :func:`write_record`, checked to be one."""
    file = Path(path)
    if not file.is_file():
        raise SourceNotFound(f"{path}: no such tuning record to resume", path=str(path))
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CorruptFile(f"{path}: not a tuning record (invalid JSON: {exc})", path=str(path)) from None
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION or "settings" not in data:
        raise CorruptFile(f"{path}: not a tuning record written by loramerge tune", path=str(path))
    return data


def check_resumable(path: str | Path, recorded: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse to resume a record made with other settings, naming the first that differs."""
    for key, value in settings.items():
        before = recorded.get(key)
        if json.loads(json.dumps(json_safe(value))) != before:
            raise InvalidParameter(f"{path}: recorded with {key} = {json.dumps(before)}, but this run has "
                                   f"{key} = {json.dumps(json_safe(value))}; resume with the same settings",
                                   parameter="resume")
