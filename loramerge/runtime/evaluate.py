"""Scoring a base model and adapters on tasks: :func:`evaluate` and its :class:`Evaluation` table.

The base model is loaded once; each adapter (or merge) is swapped in, scored on every task, and
swapped out. With ``paired=True`` task i belongs to adapter i, and every model also gets the
normalized score of the merging papers: its score ÷ the task's own adapter's score (for a
perplexity, own ÷ model, so that 1.0 always means "as good as the task's own adapter").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramerge.core.adapter import Adapter
from loramerge.core.report import json_safe
from loramerge.errors import InvalidParameter
from loramerge.io.output import atomic_output
from loramerge.io.sources import load
from loramerge.runtime.data import DataSpec, Task, load_tasks
from loramerge.runtime.resident import AdapterLike, Mode, Runtime
from loramerge.runtime.scoring import ScoreFunction, TaskScore

BASE_LABEL = "base"


@dataclass
class Evaluation:
    """Scores of every model on every task: ``scores[model][task]`` (``base`` first).

    ``own`` maps each task to the model that is its own adapter (``paired`` evaluations).
    """

    tasks: list[str]
    scores: dict[str, dict[str, TaskScore]]
    own: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.scores)

    def score(self, model: str, task: str) -> float:
        return self.scores[model][task].score

    def normalized(self, model: str) -> dict[str, float]:
        """Per paired task: ``model``'s score relative to the task's own adapter (1.0 = as good)."""
        out = {}
        for task, owner in self.own.items():
            mine, theirs = self.scores[model][task], self.scores[owner][task]
            if mine.higher_is_better:
                out[task] = mine.score / theirs.score if theirs.score else math.nan
            else:
                out[task] = theirs.score / mine.score if mine.score else math.nan
        return out

    def average(self, model: str) -> dict[str, float]:
        """Means over the tasks: ``score`` (when every task has the same metric), ``accuracy``, ``loss``
        and ``normalized`` (paired), each only where it applies."""
        rows = [self.scores[model][t] for t in self.tasks]
        out: dict[str, float] = {}
        if len({r.metric for r in rows}) == 1:
            out["score"] = _mean([r.score for r in rows])
        accuracies = [r.accuracy for r in rows if r.accuracy is not None]
        if accuracies:
            out["accuracy"] = _mean(accuracies)
        losses = [r.loss for r in rows if r.loss is not None]
        if len(losses) == len(rows):
            out["loss"] = _mean(losses)
        if self.own:
            out["normalized"] = _mean(list(self.normalized(model).values()))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "own": self.own,
            "models": {
                model: {
                    "tasks": {t: s.to_dict() | ({"normalized": self.normalized(model)[t]} if t in self.own else {})
                              for t, s in per_task.items()},
                    "average": self.average(model),
                }
                for model, per_task in self.scores.items()
            },
        }

    def write_json(self, path: str | Path, *, force: bool = True) -> Path:
        with atomic_output(path, force=force, directory=False) as tmp:
            tmp.write_text(json.dumps(json_safe(self.to_dict()), indent=2) + "\n")
        return Path(path)

    def table(self) -> str:
        """The scores as a text table: one line per model, one column per task, then the averages."""
        first = self.scores[self.models[0]]
        headers = ["model", *(f"{t} ({first[t].metric})" for t in self.tasks)]
        averages = [k for k in ("score", "accuracy", "loss", "normalized") if k in self.average(self.models[0])]
        if "score" in averages and first[self.tasks[0]].metric == "acc":
            averages.remove("accuracy")  # the average score is already the mean accuracy
        headers += [{"score": "avg", "accuracy": "avg acc", "loss": "avg loss", "normalized": "avg norm"}[k]
                    for k in averages]
        lines = [headers]
        for model in self.models:
            avg = self.average(model)
            lines.append([model, *(_fmt(self.score(model, t)) for t in self.tasks), *(_fmt(avg[k]) for k in averages)])
        text = _layout(lines)
        if self.own:
            norm = [["normalized", *self.tasks, "avg"]]
            for model in self.models:
                values = self.normalized(model)
                norm.append([model, *(_fmt(values[t]) for t in self.tasks), _fmt(_mean(list(values.values())))])
            text += "\n\n" + _layout(norm)
        return text


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _layout(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def labelled(adapters: Sequence[AdapterLike] | Mapping[str, AdapterLike | Sequence[AdapterLike]]
             ) -> list[tuple[str, list[Adapter]]]:
    """``(label, adapters)`` pairs: a mapping keeps its labels; a list is labelled by each adapter's name.

    Example:
        >>> import torch
        >>> from loramerge.core.adapter import LowRank
        >>> a = Adapter({"fc": LowRank(torch.ones(1, 2), torch.ones(2, 1))}, source="/x/math")
        >>> [label for label, _ in labelled([a, a])]
        ['math', 'math#2']
    """
    if isinstance(adapters, Mapping):
        items = [(str(k), v) for k, v in adapters.items()]
    else:
        items = []
        for a in adapters:
            loaded = a if isinstance(a, Adapter) else load(a)
            items.append((loaded.name, loaded))
    out: list[tuple[str, list[Adapter]]] = []
    seen: dict[str, int] = {BASE_LABEL: 1}
    for label, value in items:
        group = [value] if isinstance(value, (Adapter, str, Path)) else list(value)
        count = seen.get(label, 0) + 1
        seen[label] = count
        out.append((label if count == 1 else f"{label}#{count}", [a if isinstance(a, Adapter) else load(a) for a in group]))
    return out


def evaluate(
    base: str | Path | Runtime | nn.Module,
    adapters: Sequence[AdapterLike] | Mapping[str, AdapterLike | Sequence[AdapterLike]] = (),
    data: DataSpec | Sequence[DataSpec] | Mapping[str, Any] = (),
    *,
    score: ScoreFunction | None = None,
    paired: bool = False,
    include_base: bool = True,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    mode: Mode = "patch",
    tokenizer: Any = None,
    allow_pickle: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Score the base model and each adapter on each task of ``data``.

    ``base`` is a model folder or Hub id (loaded once), a :class:`Runtime`, or a torch module
    (then give ``tokenizer``, or a ``score`` function). ``adapters`` is a list (labelled by
    name) or a mapping label → adapter, or label → list of adapters (their sum). ``data`` is a
    file, ``NAME=FILE``, a list of those, or a mapping name → file or rows. ``score(model,
    rows) -> float`` replaces the built-in metrics. With ``paired``, task i is adapter i's own task.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from loramerge.core.adapter import LowRank
        >>> net = nn.Sequential()
        >>> net.add_module("fc", nn.Linear(1, 1, bias=False))
        >>> _ = torch.nn.init.zeros_(net.fc.weight)
        >>> lift = Adapter({"fc": LowRank(torch.ones(1, 1), torch.ones(1, 1))}, source="lift")
        >>> mean_output = lambda model, rows: float(model(torch.tensor([[r["x"]] for r in rows])).mean())
        >>> result = evaluate(net, [lift], {"probe": [{"x": 1.0}, {"x": 3.0}]}, score=mean_output)
        >>> result.score("base", "probe"), result.score("lift", "probe")
        (0.0, 2.0)
    """
    groups = labelled(adapters)
    tasks: list[Task] = load_tasks(data, limit=limit, validate=score is None)
    if not tasks:
        raise InvalidParameter("no evaluation data: give at least one task")
    own: dict[str, str] = {}
    if paired:
        if len(groups) < len(tasks):
            raise InvalidParameter(f"--paired needs one adapter per task, in order: {len(tasks)} task(s) but "
                                   f"{len(groups)} adapter(s)")
        own = {task.name: label for task, (label, _) in zip(tasks, groups)}
    if isinstance(base, Runtime):
        runtime = base
    elif isinstance(base, nn.Module):
        runtime = Runtime(base, tokenizer, mode=mode)
    else:
        runtime = Runtime.load(base, device=device, dtype=dtype, mode=mode, allow_pickle=allow_pickle)
    for _, group in groups:  # every refusal before the first forward pass
        for adapter in group:
            runtime.placements(adapter)
    scores: dict[str, dict[str, TaskScore]] = {}
    if include_base:
        runtime.restore()
        scores[BASE_LABEL] = runtime.evaluate(tasks, batch_size=batch_size, score=score, progress=progress,
                                              label=BASE_LABEL)
    for label, group in groups:
        with runtime.applied(group):
            scores[label] = runtime.evaluate(tasks, batch_size=batch_size, score=score, progress=progress, label=label)
    if not scores:
        raise InvalidParameter("nothing to evaluate: no adapters and the base model left out")
    return Evaluation([t.name for t in tasks], scores, own)
