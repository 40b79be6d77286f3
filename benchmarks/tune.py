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
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lm_tasks
from common import add_device_argument, chosen_device, device_label, synchronize

import loramerge
from loramerge.core.devices import one_core_spare
from loramerge.runtime.data import load_tasks
from loramerge.runtime.encoding import encode_task
from loramerge.runtime.resident import Runtime
from loramerge.runtime.scoring import batches, pad_right
from loramerge.tune.splits import split_tasks


def plain_pass(runtime: Runtime, tasks, batch_size: int):
    """One transformers forward pass over every row of ``tasks``, in the evaluation's padded batches."""
    prepared = []
    for task in tasks:
        encoded = encode_task(task, runtime.tokenizer, runtime.context_length())
        for group in batches(encoded, batch_size):
            ids, mask = pad_right([encoded[i].ids for i in group])
            prepared.append((ids.to(runtime.device), mask.to(runtime.device)))

    def run() -> None:
        with torch.inference_mode():
            for ids, mask in prepared:
                runtime.model(input_ids=ids, attention_mask=mask, use_cache=False)

    return run


def median_seconds(fn, repeats: int) -> float:
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    args = parser.parse_args()
    device = chosen_device(args.device)
    with one_core_spare() if device.type == "cpu" else _null():
        run(args, device)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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

    # One plain forward pass over the tune rows, against the median trial of each run.
    tune_rows, _ = split_tasks(load_tasks(data), args.holdout, args.seed)
    runtime.restore()
    plain = median_seconds(plain_pass(runtime, tune_rows, args.batch_size), args.repeats)
    rows = sum(len(t) for t in tune_rows)
    print(f"\ntimings on {device_label(device)} ({rows} tune rows in {len(tune_rows)} tasks, batch {args.batch_size}):")
    print(f"  plain transformers forward pass over the tune rows: {plain * 1e3:9.1f} ms")
    timings = {"plain_forward_ms": plain * 1e3}
    for method, result in results.items():
        done = [t for t in result.trials if t.ok]
        trial = statistics.median(t.seconds for t in done)
        merge = statistics.median(t.merge_seconds for t in done)
        print(f"  median trial, {method:7}: {trial * 1e3:9.1f} ms = {trial / plain:.2f} passes "
              f"(merge/swap {merge * 1e3:.1f} ms)")
        timings[f"{method}_trial_ms"] = trial * 1e3
        timings[f"{method}_merge_ms"] = merge * 1e3
    figures["timings"] = timings
    figures["runs"] = {m: r.to_dict() for m, r in results.items()}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
