"""Merges scored on a real (small) language model, and the runtime timed against plain transformers.

The world comes from ``lm_tasks.py``: a Llama-shaped causal LM (128 wide, 4 layers) pretrained
for a few minutes on generic sequence tasks (copy, reverse, first, last), and one rank-8 PEFT
LoRA per new task (sort, add, max, a letter cipher) trained on that task alone. It is built once
into ``--cache`` and reused.

Reported on each task's held-out test split (exact match of the completion under teacher
forcing), per task, on average and normalized by the task's own LoRA: the base model, each LoRA,
``linear`` with weights 1 (the plain sum), ``linear`` with weights 1/T (the mean), ``ties``
(weights 1, density 0.2) and ``regmean`` (Grams from 256 training rows per task, α = 0.9).

Timed (medians): one adapter swap (patch: W ← W₀ + ΔW from the saved W₀; hooks: install the
forward hooks), one evaluation pass over a task's test rows (with an adapter applied), and a
plain transformers forward pass over the same padded batches without any scoring. Target: a
swap under 5% of an evaluation pass.

    python benchmarks/eval.py                          # builds the world first: about 10 minutes on 2 cores
    python benchmarks/eval.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lm_tasks

import loramerge
from loramerge.core.devices import one_core_spare, resolve_device
from loramerge.runtime.data import load_tasks
from loramerge.runtime.encoding import encode_task
from loramerge.runtime.resident import Runtime
from loramerge.runtime.scoring import batches, pad_right


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cycle(runtime: Runtime, adapters: list) -> Callable[[], None]:
    """A call that swaps in the next adapter each time (so every call is a real swap)."""
    turn = [0]

    def swap() -> None:
        runtime.apply(adapters[turn[0] % len(adapters)])
        turn[0] += 1

    return swap


def plain_forward(runtime: Runtime, task, batch_size: int):
    """The same padded batches as the evaluation, through the transformers model only."""
    encoded = encode_task(task, runtime.tokenizer, runtime.context_length())
    prepared = []
    for group in batches(encoded, batch_size):
        ids, mask = pad_right([encoded[i].ids for i in group])
        prepared.append((ids.to(runtime.device), mask.to(runtime.device)))

    def run() -> None:
        with torch.inference_mode():
            for ids, mask in prepared:
                runtime.model(input_ids=ids, attention_mask=mask, use_cache=False)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out" / "lm",
                        help="Folder of the built model, adapters and data (built if missing).")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (training and evaluation).")
    parser.add_argument("--pretrain-steps", type=int, default=lm_tasks.Settings.pretrain_steps)
    parser.add_argument("--lora-steps", type=int, default=lm_tasks.Settings.lora_steps)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stats-rows", type=int, default=256, help="Training rows per task for RegMean's Grams.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with one_core_spare():  # on shared CPUs a spinning OpenMP pool is many times slower
        run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> None:
    settings = lm_tasks.Settings(pretrain_steps=args.pretrain_steps, lora_steps=args.lora_steps)
    world = lm_tasks.prepare(args.cache, settings, device=str(device))
    names = list(settings.tasks)
    adapters = [loramerge.load(world.adapters[t]) for t in names]
    runtime = Runtime.load(world.base, device=device)
    tests = load_tasks({t: world.data[t]["test"] for t in names})
    T = len(names)

    started = time.perf_counter()
    regmean = loramerge.merge(adapters, method="regmean", model=runtime,
                              data=[world.data[t]["train"] for t in names], limit=args.stats_rows,
                              batch_size=args.batch_size)
    regmean_seconds = time.perf_counter() - started
    candidates = {
        **dict(zip(names, adapters)),
        "linear w=1": loramerge.merge(adapters, weights=[1.0] * T),
        f"linear w=1/{T}": loramerge.merge(adapters, weights=[1.0 / T] * T),
        "ties": loramerge.merge(adapters, method="ties", weights=[1.0] * T),
        "regmean": regmean,
    }
    result = loramerge.evaluate(runtime, candidates, tests, paired=True, batch_size=args.batch_size)
    print(f"device: {device}; world: {world.folder} (built in {sum(world.seconds.values()):.0f}s: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in world.seconds.items()) + ")")
    print(f"regmean statistics and merge: {regmean_seconds:.1f}s\n")
    print(result.table())
    print("\ntoken accuracy (the fraction of completion tokens that are the argmax):")
    width = max(len(m) for m in result.models)
    print(" " * width + "".join(f"{t:>9}" for t in names) + "      avg")
    for model in result.models:
        values = [result.scores[model][t].token_accuracy or 0.0 for t in names]
        print(f"{model:<{width}}" + "".join(f"{v:9.3f}" for v in values) + f"{sum(values) / T:9.3f}")

    # ---- timings
    task = tests[0]
    swaps = {}
    for mode in ("patch", "hooks"):
        runtime.mode = mode
        swaps[mode] = median_time(cycle(runtime, adapters), args.repeats * 2, device)
        runtime.apply(adapters[0])
        swaps[f"eval {mode}"] = median_time(lambda: runtime.evaluate([task], batch_size=args.batch_size),
                                            args.repeats, device)
        runtime.restore()
    runtime.mode = "patch"
    runtime.apply(adapters[0])
    plain = median_time(plain_forward(runtime, task, args.batch_size), args.repeats, device)
    runtime.restore()
    adapted = sum(p.numel() for a in adapters[:1] for p in
                  (runtime.parameter(pl.parameter) for pl in runtime.placements(a).values()))
    print(f"\ntimings on {device} ({len(task)} rows of {task.name}, batch {args.batch_size}, "
          f"{adapted / 1e6:.2f}M adapted weights; medians of {args.repeats}):")
    print(f"  plain transformers forward pass:        {plain * 1e3:9.2f} ms")
    for mode in ("patch", "hooks"):
        print(f"  evaluation pass, {mode:5}:                {swaps[f'eval {mode}'] * 1e3:9.2f} ms "
              f"({swaps[f'eval {mode}'] / plain:.2f}x the plain pass)")
    for mode in ("patch", "hooks"):
        print(f"  adapter swap, {mode:5}:                   {swaps[mode] * 1e3:9.3f} ms "
              f"({100 * swaps[mode] / swaps[f'eval {mode}']:.2f}% of an evaluation pass)")
    faster = min(("patch", "hooks"), key=lambda m: swaps[m] + swaps[f"eval {m}"])
    print(f"  swap + one pass: patch {1e3 * (swaps['patch'] + swaps['eval patch']):.2f} ms, hooks "
          f"{1e3 * (swaps['hooks'] + swaps['eval hooks']):.2f} ms -> {faster} is faster")
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(device), "scores": result.to_dict(), "regmean_seconds": regmean_seconds,
            "timings_ms": {"plain_forward": plain * 1e3, **{k: v * 1e3 for k, v in swaps.items()}},
            "world_seconds": world.seconds,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
