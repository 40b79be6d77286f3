"""Tuning merges on data: holdout scores of every baseline and of ``tune`` with ``linear`` and ``ties``, and the
cost of a trial against one plain forward pass over the tune rows.

The world is ``lm_tasks.py``'s (the one ``benchmarks/eval.py`` uses, built once into ``--cache``):
a Llama-shaped causal LM (128 wide, 4 layers) and one rank-8 PEFT LoRA per task (sort, max, a
letter cipher, shift). The data are each task's validation split (256 rows), which ``tune``
splits, seeded, into tune and holdout rows (``--holdout``); the holdout rows are scored once, at
the end, for the search's best and for every baseline: the base model, each LoRA alone,
``linear`` with weights 1 and ``linear`` with λ alone tuned on a grid. The objective is the mean
over tasks of exact match normalized by each task's own LoRA (``--paired``); ``--metric
token_accuracy`` gives partial credit.

Timed: the median trial (swap or merge, then scoring the tune rows) against a plain transformers
forward pass over the same rows in the same padded batches (target: a trial costs at most 1.5
passes).

    python benchmarks/tune.py                         # builds the world first if needed (about 10 minutes on 2 cores)
    python benchmarks/tune.py --device cuda --budget 60 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lm_tasks
from common import add_device_argument, chosen_device, device_label, timed
from eval import plain_forward

import loramerge
from loramerge.core.devices import one_core_spare
from loramerge.runtime.data import load_tasks
from loramerge.runtime.resident import Runtime
from loramerge.tune.evaluator import EvaluatorSpec, TrialEvaluator
from loramerge.tune.splits import split_tasks


def plain_pass(runtime: Runtime, tasks, batch_size: int):
    """One transformers forward pass over every row of ``tasks``, in the evaluation's padded batches."""
    runs = [plain_forward(runtime, task, batch_size) for task in tasks]

    def run() -> None:
        for one in runs:
            one()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out" / "lm",
                        help="Folder of the built model, adapters and data (built if missing).")
    add_device_argument(parser)
    parser.add_argument("--budget", type=int, default=40, help="Search trials per method.")
    parser.add_argument("--holdout", type=float, default=0.5)
    parser.add_argument("--metric", default="score", choices=("score", "token_accuracy", "loss"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", default="linear,ties", help="Comma-separated methods to tune, one run each.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    args = parser.parse_args()
    device = chosen_device(args.device)
    with one_core_spare() if device.type == "cpu" else contextlib.nullcontext():
        run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> None:
    world = lm_tasks.prepare(args.cache, lm_tasks.Settings(), device=str(device))
    names = list(world.settings.tasks)
    sources = [world.adapters[t] for t in names]
    data = [f"{t}={world.data[t]['val']}" for t in names]
    runtime = Runtime.load(world.base, device=device)
    print(f"device: {device_label(device)}; world: {world.folder}")
    searches = {"linear": "lambda,weights", "ties": "lambda,weights,density"}
    figures: dict[str, object] = {"device": str(device)}
    results = {}
    for method in args.methods.split(","):
        started = time.perf_counter()
        result = loramerge.tune(runtime, sources, data, method=method, search=searches.get(method, "lambda,weights"),
                                budget=args.budget, holdout=args.holdout, metric=args.metric, paired=True,
                                seed=args.seed, batch_size=args.batch_size)
        results[method] = result
        print(f"\n== tune -m {method} --search {searches.get(method)} --budget {args.budget} "
              f"({time.perf_counter() - started:.0f}s)")
        print(result.report)

    # One plain forward pass over the tune rows against one trial of each run's best candidate, taken
    # in turns (so that the load of a shared machine falls on both alike), medians.
    tune_rows, held_rows = split_tasks(load_tasks(data), args.holdout, args.seed)
    runtime.restore()
    evaluator = TrialEvaluator(EvaluatorSpec(None, sources, {"tune": tune_rows, "holdout": held_rows},
                                             batch_size=args.batch_size), runtime)
    plain = plain_pass(runtime, tune_rows, args.batch_size)
    rows = sum(len(t) for t in tune_rows)
    samples: dict[str, list[float]] = {"plain": []}
    merges: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        samples["plain"].append(timed(plain, 1, warmup=False)[0])
        for method, result in results.items():
            outcome = evaluator.evaluate(result.search_best.candidate)
            samples.setdefault(method, []).append(outcome.merge_seconds + outcome.eval_seconds)
            merges.setdefault(method, []).append(outcome.merge_seconds)
    plain_s = statistics.median(samples["plain"])
    print(f"\ntimings on {device_label(device)} ({rows} tune rows in {len(tune_rows)} tasks, batch {args.batch_size}, "
          f"medians of {args.repeats}, taken in turns):")
    print(f"  plain transformers forward pass over the tune rows: {plain_s * 1e3:9.1f} ms")
    timings = {"plain_forward_ms": plain_s * 1e3}
    for method, result in results.items():
        trial, merge = statistics.median(samples[method]), statistics.median(merges[method])
        during = statistics.median(t.seconds for t in result.trials if t.ok)
        print(f"  one trial, {method:7}: {trial * 1e3:9.1f} ms = {trial / plain_s:.2f} passes "
              f"(merge/swap {merge * 1e3:.1f} ms; median trial during the search {during * 1e3:.1f} ms)")
        timings[f"{method}_trial_ms"] = trial * 1e3
        timings[f"{method}_merge_ms"] = merge * 1e3
        timings[f"{method}_search_trial_ms"] = during * 1e3
    figures["timings"] = timings
    figures["runs"] = {m: r.to_dict() for m, r in results.items()}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
