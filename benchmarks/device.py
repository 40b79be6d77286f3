"""CPU against GPU in one run: re-rank, per-entry merges, fold and extract, plus the accelerator decision.

Each task runs on the CPU and, where CUDA is available, on the GPU, in this process and on the
same inputs (interleaved repeats, median), and the table gives CPU time ÷ GPU time. Without a
GPU only the CPU column is filled and the script says so.

1. ``svd``: a Llama-2-7B-shaped re-rank (q, k, v, o, gate, up, down per layer; 3 sources of rank
   16 → rank 16). ``svd`` is a factor-space method, so its maths stays on the CPU whatever
   ``--device`` says (``uses_accelerator``); the GPU column shows that the choice costs nothing.
2. ``ties`` and ``dare_ties`` on 4096×11008 modules (3 sources of rank 16, output rank 16): dense
   per-entry work, sent to the accelerator.
3. ``fold`` of a synthetic Llama checkpoint in bf16 (``--fold-gb``; the full run uses 3.2 GB) with
   a rank-16 adapter on every linear layer, disk to disk, after one untimed read of the files.
4. ``extract`` of rank 16 from a bf16 base/fine-tune pair of the same widths (``--extract-layers``).
5. The accelerator decision: one 4096×11008 module per method, run by the engine on the CPU,
   and (on a GPU) the method and its rank policy forced onto the GPU, per module.

    python benchmarks/device.py            # small sizes, a few minutes on a laptop CPU
    python benchmarks/device.py --full     # 32 layers, 4 dense modules, a 3.2 GB fold, 4 extract layers
    python benchmarks/device.py --device cuda:1 --skip-fold
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import add_device_argument, chosen_device, device_label, llama_adapter, synchronize
from fold import LINEAR, layers_for, write_adapter, write_model

import loramerge
from loramerge.core.adapter import Adapter
from loramerge.merge.engine import finalize
from loramerge.merge.methods import ModuleInputs, available_methods, module_seed

RANK = 16
SOURCES = 3
WIDE = {"mlp.down_proj": (4096, 11008)}  # the 4096×11008 module of Llama-2-7B
FULL = {"layers": 32, "dense_modules": 4, "fold_gb": 3.2, "extract_layers": 4}


def median_time(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(label: str, work: Callable[[str], object], devices: list[str], repeats: int,
            rows: list[tuple[str, dict[str, float]]], warmup: bool = True) -> None:
    """``work(device)`` on every device, interleaved (after one untimed warm-up run each, by default)."""
    for device in devices if warmup else ():
        work(device)
    times: dict[str, list[float]] = {d: [] for d in devices}
    for _ in range(repeats):
        for device in devices:
            times[device].append(median_time(lambda d=device: work(d), 1))
    medians = {d: statistics.median(t) for d, t in times.items()}
    rows.append((label, medians))
    cells = "   ".join(f"{d}: {s:8.2f} s" for d, s in medians.items())
    print(f"  {label:<44} {cells}", flush=True)


def dense_sources(modules: int) -> list[Adapter]:
    shapes = {f"mlp.down_proj_{i}": WIDE["mlp.down_proj"] for i in range(modules)}
    return [llama_adapter(s, 1, rank=RANK, shapes=shapes) for s in range(SOURCES)]


def read_all(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


def accelerator_decision(accelerator: str | None) -> None:
    """Per-module time of every method on one 4096×11008 module: the engine on the CPU, and forced onto the GPU."""
    sources = [llama_adapter(s, 1, rank=RANK, shapes=WIDE) for s in range(SOURCES)]
    module = "model.layers.0.mlp.down_proj"
    print(f"\n5. accelerator decision: one {WIDE['mlp.down_proj'][0]}×{WIDE['mlp.down_proj'][1]} module, "
          f"{SOURCES} sources of rank {RANK}, default parameters and rank policy (ms per module)")
    print(f"  {'method':<16} {'uses accel.':>11} {'CPU (engine)':>13} {'GPU (forced)':>13}")
    for spec in available_methods():
        used = sources[: spec.max_sources or SOURCES]
        repeats = 1 if spec.dense else 5
        cpu = median_time(lambda used=used, spec=spec: loramerge.merge(used, method=spec.name, device="cpu"), repeats)
        gpu = "-"
        if accelerator is not None:
            terms = [a.layers[module].to(dtype=torch.float32, device=accelerator) for a in used]
            params = spec.resolve({}, sources=len(used))

            def forced(spec=spec, terms=terms, params=params) -> None:
                inputs = ModuleInputs(module, terms, [1.0] * len(terms), seed=module_seed(0, module))
                finalize(spec.function(inputs, **params), inputs, spec, loramerge.RankPolicy())

            forced()
            gpu = f"{median_time(forced, repeats) * 1000:13.1f}"
        print(f"  {spec.name:<16} {'yes' if spec.uses_accelerator else 'no':>11} {cpu * 1000:13.1f} {gpu:>13}",
              flush=True)
    if accelerator is None:
        print("  GPU column not measured: no GPU was available")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--full", action="store_true", help="the full sizes: " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    parser.add_argument("--layers", type=int, default=2, help="Llama-2-7B layers of the svd re-rank (full: 32)")
    parser.add_argument("--dense-modules", type=int, default=1, help="4096×11008 modules for ties/dare_ties (full: 4)")
    parser.add_argument("--fold-gb", type=float, default=0.25, help="bf16 checkpoint size to fold (full: 3.2)")
    parser.add_argument("--extract-layers", type=int, default=1, help="layers of the extract pair (full: 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    for part in ("svd", "dense", "fold", "extract", "decision"):
        parser.add_argument(f"--skip-{part}", action="store_true")
    args = parser.parse_args()
    if args.full:
        for key, value in FULL.items():
            setattr(args, key, value)

    device = chosen_device(args.device)
    accelerator = str(device) if device.type != "cpu" else None
    devices = ["cpu"] + ([accelerator] if accelerator else [])
    print(f"torch {torch.__version__}; CPU: {device_label(torch.device('cpu'))}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if accelerator:
        print(f"GPU: {device_label(device)}")
    elif torch.cuda.is_available():
        print("GPU available but --device cpu was given: CPU side only")
    else:
        print("no GPU was available: only the CPU side is measured (the GPU columns are empty)")

    rows: list[tuple[str, dict[str, float]]] = []
    if not args.skip_svd:
        adapters = [llama_adapter(s, args.layers, rank=RANK) for s in range(SOURCES)]
        print(f"\n1. svd re-rank: {args.layers} Llama-2-7B layers × 7 modules, {SOURCES} sources of rank {RANK} → "
              f"rank {RANK}")
        compare(f"svd ({args.layers * 7} modules)",
                lambda d: loramerge.merge(adapters, method="svd", rank=RANK, device=d), devices, args.repeats, rows)
        del adapters
    if not args.skip_dense:
        adapters = dense_sources(args.dense_modules)
        print(f"\n2. per-entry merges: {args.dense_modules} module(s) of 4096×11008, {SOURCES} sources of rank {RANK} "
              f"→ rank {RANK}")
        for method in ("ties", "dare_ties"):
            compare(f"{method} ({args.dense_modules} modules)",
                    lambda d, m=method: loramerge.merge(adapters, method=m, rank=RANK, device=d),
                    devices, max(1, args.repeats - 1), rows)
        del adapters
    root = Path(tempfile.mkdtemp(prefix="loramerge-device-bench-", dir=args.workdir))
    try:
        if not args.skip_fold:
            layers = layers_for(args.fold_gb, 2)
            model, adapter = root / "base", root / "adapter"
            write_model(model, layers, 4, torch.bfloat16)
            write_adapter(adapter, model, layers, RANK)
            size = sum(p.stat().st_size for p in model.iterdir()) / 1e9
            print(f"\n3. fold: {size:.2f} GB bf16 Llama checkpoint (hidden 2048, {layers} layers), rank-{RANK} adapter "
                  f"on {layers * len(LINEAR)} modules, disk to disk")
            read_all(model)

            def fold_on(d: str) -> None:
                loramerge.fold(model, adapter, output=root / f"folded-{d}", device=d, force=True)

            compare(f"fold ({size:.2f} GB)", fold_on, devices, args.repeats, rows, warmup=False)
            shutil.rmtree(model)
            for d in devices:
                shutil.rmtree(root / f"folded-{d}", ignore_errors=True)
        if not args.skip_extract:
            base, ft = root / "x-base", root / "x-ft"
            write_model(base, args.extract_layers, 2, torch.bfloat16, seed=3)
            write_model(ft, args.extract_layers, 2, torch.bfloat16, seed=3, delta_rank=64)
            print(f"\n4. extract: bf16 pair, {args.extract_layers} layer(s) × {len(LINEAR)} modules (hidden 2048), "
                  f"true update rank 64 + noise → rank {RANK}")
            read_all(base)
            read_all(ft)
            compare(f"extract ({args.extract_layers * len(LINEAR)} modules)",
                    lambda d: loramerge.extract(base, ft, output=root / f"x-{d}", rank=RANK, device=d, force=True),
                    devices, args.repeats, rows, warmup=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if rows:
        print("\n| task | CPU | GPU | CPU ÷ GPU |")
        print("|---|---|---|---|")
        for label, medians in rows:
            gpu = medians.get(accelerator) if accelerator else None
            ratio = f"{medians['cpu'] / gpu:.1f}×" if gpu else "no GPU"
            print(f"| {label} | {medians['cpu']:.2f} s | {f'{gpu:.2f} s' if gpu else '-'} | {ratio} |")
    if not args.skip_decision:
        accelerator_decision(accelerator)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
