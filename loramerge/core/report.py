"""Per-module statistics of a merge, their JSON form and the summary table printed at the end."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModuleReport:
    """What one module's merge kept.

    ``energy_kept`` is the fraction of Σσ² of the method's own result kept by the rank policy and
    ``relative_error`` is ‖D − D_k‖_F / ‖D‖_F against that result. ``extra`` holds method-specific
    figures such as the sign-conflict fraction or the density kept.
    """

    module: str
    source_ranks: list[int | None]
    output_rank: int
    energy_kept: float = 1.0
    relative_error: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class MergeReport:
    """The record of a merge: method, weights, parameters and one :class:`ModuleReport` per module.

    Example:
        >>> r = MergeReport("linear", [1.0], {}, [ModuleReport("m", [4], 4)])
        >>> r.to_dict()["totals"]["modules"]
        1
    """

    method: str
    weights: list[float]
    parameters: dict[str, Any]
    modules: list[ModuleReport] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    seconds: float = 0.0
    origins: list[dict[str, Any]] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        """Aggregate figures: module count, total output rank, mean energy, worst error, and the
        mean of each method statistic (``mean_sign_conflicts``, ``mean_density_kept``, …)."""
        errors = [m.relative_error for m in self.modules]
        energies = [m.energy_kept for m in self.modules]
        totals: dict[str, Any] = {
            "modules": len(self.modules),
            "output_rank_total": sum(m.output_rank for m in self.modules),
            "mean_energy_kept": sum(energies) / len(energies) if energies else 1.0,
            "max_relative_error": max(errors) if errors else 0.0,
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        }
        for key in self.extra_keys():
            values = [m.extra[key] for m in self.modules if key in m.extra]
            totals[f"mean_{key}"] = sum(values) / len(values)
        return totals

    def extra_keys(self) -> list[str]:
        """The method statistics any module reports, in first-seen order."""
        return list(dict.fromkeys(key for m in self.modules for key in m.extra))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weights": self.weights,
            "parameters": self.parameters,
            "sources": self.sources,
            "origins": self.origins,
            "seconds": self.seconds,
            "totals": self.totals(),
            "modules": [asdict(m) for m in self.modules],
        }

    def write_json(self, path: str | Path) -> Path:
        """Write the report as JSON (non-finite numbers become null) and return the path."""
        path = Path(path)
        path.write_text(json_text(self.to_dict()))
        return path

    def summary(self, worst: int = 5) -> str:
        """A short text table: the ``worst`` modules by relative error, then the totals.

        Method statistics (sign conflicts, density kept, …) get a column each and their mean in
        the totals line.

        Example:
            >>> r = MergeReport("ties", [1.0, 1.0], {}, [ModuleReport("m", [4, 4], 4, 0.9, 0.3, {"sign_conflicts": 0.1})])
            >>> print(r.summary().splitlines()[-1])
            1 modules, total rank 4, mean energy kept 0.9000, worst relative error 3.00e-01, mean sign_conflicts 0.1000
        """
        keys = self.extra_keys()
        header = f"{'module':<48} {'ranks':>12} {'out':>5} {'energy':>8} {'rel.err':>9}"
        lines = [header + "".join(f" {_clip(key, 14):>14}" for key in keys)]
        ranked = sorted(self.modules, key=lambda m: m.relative_error, reverse=True)[:worst]
        for m in ranked:
            ranks = ",".join("-" if r is None else str(r) for r in m.source_ranks)
            extras = "".join(f" {m.extra[key]:>14.4g}" if key in m.extra else f" {'-':>14}" for key in keys)
            lines.append(
                f"{_clip(m.module, 48):<48} {_clip(ranks, 12):>12} {m.output_rank:>5} "
                f"{m.energy_kept:>8.4f} {m.relative_error:>9.2e}{extras}"
            )
        t = self.totals()
        means = "".join(f", mean {key} {t[f'mean_{key}']:.4f}" for key in keys)
        lines.append(
            f"{t['modules']} modules, total rank {t['output_rank_total']}, mean energy kept "
            f"{t['mean_energy_kept']:.4f}, worst relative error {t['max_relative_error']:.2e}{means}"
        )
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def json_text(data: Any) -> str:
    """``data`` as indented JSON text, non-finite numbers written as null (JSON has no NaN).

    Example:
        >>> json_text({"error": float("nan"), "rank": [4]})
        '{\\n  "error": null,\\n  "rank": [\\n    4\\n  ]\\n}\\n'
    """
    return json.dumps(json_safe(data), indent=2) + "\n"


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities turned into None, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
