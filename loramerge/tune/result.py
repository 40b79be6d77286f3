"""The outcome of a tuning run: the chosen merge, every trial, the baselines and the report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.core.adapter import Adapter
from loramerge.runtime.scoring import TaskScore
from loramerge.tune.record import Trial, write_record
from loramerge.tune.space import Candidate

SEARCH_LABEL = "tuned"
CHEAP_LABELS = ("linear w=1", "linear λ")


@dataclass
class Scored:
    """One model's figures on one split: per-task scores, the per-task values of the objective, the objective."""

    scores: dict[str, TaskScore]
    values: dict[str, float]
    objective: float

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "values": self.values,
                "scores": {t: s.to_dict() for t, s in self.scores.items()}}


@dataclass
class Baseline:
    """A reference model: ``candidate`` None is the base model. ``tune``/``holdout`` are its figures there."""

    label: str
    candidate: Candidate | None
    tune: Scored | None = None
    holdout: Scored | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "candidate": self.candidate.to_dict() if self.candidate else None,
                "tune": self.tune.to_dict() if self.tune else None,
                "holdout": self.holdout.to_dict() if self.holdout else None}


@dataclass
class TuneResult:
    """What :func:`loramerge.tune` returns.

    ``best`` is the chosen merge as an :class:`Adapter` (its ``report`` carries the method, weights
    and parameters, so a recipe reproduces it), ``candidate`` its description and ``chosen`` its
    label: the search's best candidate (``tuned``) or, when that does not beat the cheap
    baselines on the holdout rows, the better of those. ``trials`` lists every search trial,
    ``baselines`` the reference models (the search's best is the ``tuned`` entry) with their tune
    and holdout figures, and ``report`` the text table. ``statistics_rows`` holds, for a chosen
    data-aware method (``regmean``), each source's rows its statistics came from (the tune rows).
    """

    best: Adapter
    candidate: Candidate
    chosen: str
    trials: list[Trial]
    baselines: dict[str, Baseline]
    settings: dict[str, Any]
    stopped: str = "budget"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    statistics_rows: dict[str, list[dict[str, Any]]] | None = None

    @property
    def search_best(self) -> Baseline:
        return self.baselines[SEARCH_LABEL]

    @property
    def beaten(self) -> bool:
        """True when the search's best beats every cheap baseline (``linear`` merges) on the holdout rows."""
        return self.chosen == SEARCH_LABEL

    @property
    def report(self) -> str:
        return self.table()

    def table(self) -> str:
        """The holdout scores of every baseline next to the chosen merge, and a verdict line."""
        tasks = list(next(iter(self.baselines.values())).holdout.scores) if self.baselines else []  # type: ignore[union-attr]
        header = ["model", *tasks, "objective (holdout)", "objective (tune)"]
        rows = [header]
        for label, base in self.baselines.items():
            held = base.holdout
            cells = [f"{_fmt(held.values[t])}" if held else "-" for t in tasks]
            rows.append([base.label + (" *" if label == self.chosen else ""), *cells,
                         _fmt(held.objective) if held else "-", _fmt(base.tune.objective) if base.tune else "-"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        done = [t for t in self.trials if t.ok]
        failed = sum(1 for t in self.trials if t.status == "failed")
        lines.append("")
        lines.append(f"{len(self.trials)} trials ({failed} failed), stopped by {self.stopped}; per-task columns are "
                     "holdout values" + (" normalized by each task's own adapter" if self.settings.get("paired") else ""))
        if done:
            median = sorted(t.seconds for t in done)[len(done) // 2]
            lines.append(f"median trial: {median:.3f}s (merge/swap + evaluation of the tune rows)")
        lines.extend(self.notes)
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: whether the search beat the cheap ``linear`` baselines on the holdout rows, and what was chosen."""
        tuned = self.baselines[SEARCH_LABEL].holdout
        cheap = max((k for k in CHEAP_LABELS if self.baselines.get(k) and self.baselines[k].holdout),
                    key=lambda k: self.baselines[k].holdout.objective, default=None)  # type: ignore[union-attr]
        ours = tuned.objective if tuned else math.nan
        theirs = self.baselines[cheap].holdout.objective if cheap else math.nan  # type: ignore[union-attr]
        if cheap is not None and not ours >= theirs:
            head = (f"the search did NOT beat the cheap baseline {self.baselines[cheap].label!r} on the holdout rows "
                    f"({_fmt(ours)} vs {_fmt(theirs)})")
            kept = " (kept: no fallback)" if self.chosen == SEARCH_LABEL else ""
            return f"{head}; chosen: {self.baselines[self.chosen].label}{kept}: {self.candidate.describe()}"
        return f"the search's best beats the cheap baselines on the holdout rows ({_fmt(ours)} vs {_fmt(theirs)}); " \
               f"chosen: {self.candidate.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings, "stopped": self.stopped, "seconds": self.seconds, "chosen": self.chosen,
            "candidate": self.candidate.to_dict(), "notes": self.notes,
            "baselines": {k: b.to_dict() for k, b in self.baselines.items()},
            "trials": [t.to_dict() for t in self.trials],
        }

    def write_json(self, path: str | Path) -> Path:
        return write_record(path, self.to_dict())

    def plot(self, path: str | Path) -> Path:
        """A PNG of the objective against the trial and the per-task holdout values (needs the ``plot`` extra)."""
        from loramerge.tune.plot import plot_result

        return plot_result(self, path)


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "nan" if value is None or math.isnan(value) else str(value)
    return f"{value:.4f}"


def scored(scores: Mapping[str, TaskScore], values: Mapping[str, float], objective: float) -> Scored:
    return Scored(dict(scores), dict(values), objective)
