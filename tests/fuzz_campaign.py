"""The fuzz campaign: many cases per target, every outcome counted (``python -m tests.fuzz_campaign``).

Unlike the property tests, which stop at the first broken promise, the campaign runs every case
and tallies them by kind (see :mod:`tests.fuzz_cases`), so two checkouts can be compared: run it
in an older checkout with this file and ``fuzz_cases.py`` copied into its ``tests/`` to get the
"before" figures.

    python -m tests.fuzz_campaign --cases 300 --json campaign.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from tests import fuzz_cases as fc  # noqa: E402


def campaign(name: str, strategy: st.SearchStrategy, run, cases: int, seed: int) -> dict:
    counts: collections.Counter = collections.Counter()
    details: collections.Counter = collections.Counter()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(drawn):
        outcome = run(drawn)
        counts[outcome.kind] += 1
        if not outcome.kept:
            details[f"{outcome.kind}: {outcome.detail}"[:140]] += 1

    start = time.perf_counter()
    body._hypothesis_internal_use_seed = seed  # a reproducible stream of cases
    body()
    return {"target": name, "cases": sum(counts.values()), "counts": dict(counts),
            "failures": sum(v for k, v in counts.items() if k not in fc.KINDS_KEPT),
            "top": details.most_common(8), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="cases per target (fold runs a fifth of them)")
    parser.add_argument("--targets", nargs="*", default=list(fc.TARGETS))
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.targets:
        strategy, run = fc.TARGETS[name]
        cases = max(1, args.cases // 5) if name == "fold" else args.cases
        row = campaign(name, strategy, run, cases, args.seed)
        rows.append(row)
        print(f"{name:14s} cases {row['cases']:5d}  failures {row['failures']:4d}  {row['counts']}  "
              f"({row['seconds']}s)", flush=True)
        for detail, count in row["top"]:
            print(f"    {count:4d} × {detail}", flush=True)
    total = sum(r["cases"] for r in rows)
    failures = sum(r["failures"] for r in rows)
    print(f"total: {total} cases, {failures} failures")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "total": total, "failures": failures}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
