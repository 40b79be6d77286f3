"""A PNG of a tuning run (the ``plot`` extra, matplotlib): the objective against the trial, and the
per-task holdout values of the baselines and the chosen merge."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from loramerge.errors import MissingDependency
from loramerge.io.output import atomic_output

PLOT_HINT = 'pip install "loramerge[plot]"'


def require_matplotlib() -> Any:
    """matplotlib's ``pyplot`` on the non-interactive Agg backend, or :class:`MissingDependency`."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise MissingDependency(f"--plot needs matplotlib, which is not installed; install it with: {PLOT_HINT}") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot_result(result: Any, path: str | Path) -> Path:
    """Write the figure of a :class:`~loramerge.tune.result.TuneResult` to ``path`` (PNG), atomically."""
    plt = require_matplotlib()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    done = [t for t in result.trials if t.ok]
    if done:
        numbers = [t.number for t in done]
        values = [float(t.value) for t in done if t.value is not None]
        best, running = -math.inf, []
        for v in values:
            best = max(best, v)
            running.append(best)
        left.scatter(numbers, values, s=12, alpha=0.6, label="trial")
        left.step(numbers, running, where="post", color="C3", label="best so far")
    for label, base in result.baselines.items():
        if base.tune is not None and label != "tuned" and math.isfinite(base.tune.objective):
            left.axhline(base.tune.objective, linestyle=":", linewidth=1, color="grey")
            left.annotate(base.label, (0, base.tune.objective), fontsize=7, color="grey", va="bottom")
    left.set_xlabel("trial")
    left.set_ylabel("objective on the tune rows")
    left.set_title("search")
    left.legend(loc="lower right", fontsize=8)

    shown = {label: b for label, b in result.baselines.items() if b.holdout is not None}
    tasks = list(next(iter(shown.values())).holdout.scores) if shown else []  # type: ignore[union-attr]
    width = 0.8 / max(len(shown), 1)
    for i, (label, base) in enumerate(shown.items()):
        assert base.holdout is not None
        xs = [j + i * width for j in range(len(tasks))]
        right.bar(xs, [base.holdout.values[t] for t in tasks], width=width,
                  label=base.label + (" (chosen)" if label == result.chosen else ""))
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    right.set_ylabel("holdout value" + (" (normalized)" if result.settings.get("paired") else ""))
    right.set_title("holdout")
    right.legend(fontsize=7)
    figure.tight_layout()
    with atomic_output(path, force=True, directory=False) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return Path(path)
