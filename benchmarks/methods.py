"""Every merge method on Llama-2-7B-shaped adapters: time and peak memory, and per-entry methods against PEFT.

Part 1 runs each method in a fresh subprocess on 3 sources of rank 16 (q, k, v, o, gate, up, down;
hidden 4096, intermediate 11008) with its default parameters and default rank policy, and reports
the wall time and the peak resident memory above the inputs (sampled every 5 ms). Factor-space
methods (linear, svd, KnOTS, TSV, Iso, Core Space, SLERP) run on all ``--layers`` layers; the
per-entry methods (TIES, DARE, …), which must form each dense m×n update, run on
``--entry-layers`` layers and their time is extrapolated linearly (modules are merged one at a
time and independently, so time is proportional to the number of layers).

Part 2 compares TIES and DARE-TIES with PEFT 0.21.2's ``add_weighted_adapter(ties_svd /
dare_ties_svd)`` on the same inputs: one module of each distinct shape (4096×4096, 11008×4096,
4096×11008), both tools in this process, same density, weights 1, output rank 16. A layer is
4 × (4096×4096) + 2 × (11008×4096) + 1 × (4096×11008), which gives the per-layer and 32-layer
extrapolations. PEFT runs a full dense SVD (``full_matrices=True``, its default) of each delta.

    python benchmarks/methods.py                       # everything (long: PEFT takes minutes per module)
    python benchmarks/methods.py --skip-peft --threads 1
    python benchmarks/methods.py --layers 4 --entry-layers 1 --methods svd,ties,knots

On a shared machine, many small OpenMP-parallel operations stall when another process holds the
other core: the factor-space merges ran 20× slower with 2 threads than with 1 there. ``--threads``
fixes the thread count for every worker (and for PEFT, which runs in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import LLAMA_SHAPES, add_device_argument, chosen_device, device_label, llama_adapter, synchronize  # noqa: E402

import loramerge  # noqa: E402
from loramerge.core.adapter import Adapter  # noqa: E402
from loramerge.merge.methods import available_methods  # noqa: E402
from loramerge.merge.methods.gta import RECIPES  # noqa: E402

SUBSET = {"self_attn.q_proj": 4, "mlp.gate_proj": 2, "mlp.down_proj": 1}  # module → copies per layer
RANK, SOURCES = 16, 3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The largest resident set size seen while the block runs, sampled every 5 ms in a thread."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_one(method: str, sources: list[Adapter], device: str) -> dict:
    """One merge with the method's defaults: wall time, peak RSS above the RSS just before, report figures."""
    spec = loramerge.get_method(method)
    used = sources[: spec.max_sources or SOURCES]
    baseline = rss_bytes()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        merged = loramerge.merge(used, method=method, device=device)
        seconds = time.perf_counter() - start
    totals = merged.report.totals()
    return {"method": method, "modules": len(merged), "seconds": seconds, "peak_mb": (sampler.peak - baseline) / 1e6,
            "mean_rank": totals["output_rank_total"] / len(merged), "mean_error": totals["mean_relative_error"]}


def worker(methods: list[str], layers: int, repeats: int, device: str) -> None:
    """``methods`` on ``layers`` layers in this (fresh) process, interleaved ``repeats`` times; one JSON line each.

    Interleaving and keeping the fastest run of each method makes the ratios robust to other
    processes on a shared machine; the peak memory is the largest seen over the repeats.
    """
    sources = [llama_adapter(s, layers, rank=RANK) for s in range(SOURCES)]
    inputs_mb = sum(lr.A.numel() + lr.B.numel() for a in sources for lr in a.layers.values()) * 4 / 1e6
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for method in methods:
            row = run_one(method, sources, device)
            if method in best:
                row["peak_mb"] = max(row["peak_mb"], best[method]["peak_mb"])
                row["seconds"] = min(row["seconds"], best[method]["seconds"])
            best[method] = row
    for method in methods:
        print(json.dumps(best[method] | {"layers": layers, "inputs_mb": inputs_mb, "repeats": repeats}))


def part1(methods: list[str], layers: int, entry_layers: int, repeats: int, threads: int | None,
          separate: bool = False, device: str = "auto") -> list[dict]:
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    factored = [m for m in methods if m not in RECIPES or m == "task_arithmetic"]
    if separate:  # one fresh process per method: its peak memory is not hidden by memory freed before
        jobs = [([m], layers, repeats) for m in factored]
    else:
        jobs = [(factored, layers, repeats)] if factored else []
    # Each per-entry method in a fresh process, so that its peak memory is its own.
    jobs += [([m], entry_layers, 1) for m in methods if m not in factored]
    rows = []
    for names, run_layers, reps in jobs:
        out = subprocess.run([sys.executable, __file__, "--worker", ",".join(names), "--layers", str(run_layers),
                              "--repeats", str(reps), "--device", device], capture_output=True, text=True, check=True,
                             env=env)
        for line in out.stdout.strip().splitlines():
            row = json.loads(line)
            row["seconds_full"] = row["seconds"] * layers / run_layers
            rows.append(row)
            print(f"  {row['method']:<16} {run_layers:>3} layers  {row['seconds']:8.2f} s  → {layers} layers "
                  f"{row['seconds_full']:8.1f} s   peak +{row['peak_mb']:7.0f} MB", flush=True)
    order = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda r: order[r["method"]])


def print_part1(rows: list[dict], layers: int) -> None:
    svd = next((r for r in rows if r["method"] == "svd"), None)
    print(f"\n| method | layers run | time ({layers} layers) | × svd | peak MB above inputs | mean rank | "
          "mean rel. error vs own result |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['seconds_full'] / svd['seconds_full']:.1f}×" if svd else "-"
        extrapolated = "" if r["layers"] == layers else " (extrap.)"
        print(f"| `{r['method']}` | {r['layers']} | {r['seconds_full']:.1f} s{extrapolated} | {ratio} | "
              f"{r['peak_mb']:.0f} | {r['mean_rank']:.1f} | {r['mean_error']:.3f} |")
    print(f"inputs: {rows[0]['inputs_mb'] * layers / rows[0]['layers']:.0f} MB of factors for {layers} layers; "
          "factor-space methods: fastest of the interleaved repeats")


def peft_model_for(module: str):
    """A toy model holding one Linear of ``module``'s shape with three rank-16 PEFT adapters, and the same as Adapters."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    out_f, in_f = LLAMA_SHAPES[module]
    leaf = module.split(".")[1]
    model = nn.Module()
    # add_weighted_adapter never reads the base weight: leave it uninitialised.
    setattr(model, leaf, nn.Linear(in_f, out_f, bias=False, device="meta").to_empty(device="cpu"))
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[leaf],
                                                  init_lora_weights=False), adapter_name="s0")
    for s in range(1, SOURCES):
        peft_model.add_adapter(f"s{s}", LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[leaf],
                                                    init_lora_weights=False))
    adapters = [Adapter({leaf: llama_adapter(s, 1, rank=RANK, shapes={leaf: (out_f, in_f)}).layers[f"model.layers.0.{leaf}"]})
                for s in range(SOURCES)]
    layer = peft_model.base_model.model.get_submodule(leaf)
    with torch.no_grad():
        for s, adapter in enumerate(adapters):
            layer.lora_A[f"s{s}"].weight.copy_(adapter.layers[leaf].A)
            layer.lora_B[f"s{s}"].weight.copy_(adapter.layers[leaf].B)
            assert layer.scaling[f"s{s}"] == adapter.layers[leaf].scale
    return peft_model, adapters, leaf


def part2(density: dict[str, float], device: torch.device) -> None:
    print(f"\npart 2: one module of each shape, {SOURCES} sources of rank {RANK}, weights 1, output rank {RANK}")
    from loramerge.merge.methods import ModuleInputs

    times: dict[str, dict[str, tuple[float, float]]] = {"ties": {}, "dare_ties": {}}
    for module in SUBSET:
        peft_model, adapters, leaf = peft_model_for(module)
        peft_model.to(device)
        for ours, theirs in (("ties", "ties_svd"), ("dare_ties", "dare_ties_svd")):
            d = density[ours]
            start = time.perf_counter()
            merged = loramerge.merge(adapters, method=ours, density=d, rank=RANK, device=device)
            ours_t = time.perf_counter() - start
            start = time.perf_counter()
            peft_model.add_weighted_adapter([f"s{s}" for s in range(SOURCES)], [1.0] * SOURCES, f"m_{ours}",
                                            combination_type=theirs, density=d, svd_rank=RANK)
            synchronize()
            peft_t = time.perf_counter() - start
            times[ours][module] = (ours_t, peft_t)
            note = ""
            if ours == "ties":
                # Same semantics with weights 1: compare both truncations with the dense TIES result.
                spec = loramerge.get_method("ties")
                inputs = ModuleInputs(leaf, [a.layers[leaf] for a in adapters], [1.0] * SOURCES)
                dense = spec.function(inputs, **spec.resolve({"density": d}, sources=SOURCES)).delta
                peft_delta = peft_model.base_model.model.get_submodule(leaf).get_delta_weight(f"m_{ours}").detach().cpu()
                peft_err = float((peft_delta - dense).norm() / dense.norm())
                note = (f"   rel. error vs dense TIES: loramerge {merged.report.modules[0].relative_error:.4f}, "
                        f"PEFT {peft_err:.4f}")
            print(f"  {ours:<10} {module:<17} loramerge {ours_t:7.2f} s   PEFT {theirs} {peft_t:8.2f} s   "
                  f"{peft_t / ours_t:6.1f}×{note}", flush=True)
        del peft_model
    print("\n| method | loramerge per layer | PEFT per layer | 32 layers (extrapolated) | speed-up |")
    print("|---|---|---|---|---|")
    for ours, rows in times.items():
        a = sum(rows[m][0] * c for m, c in SUBSET.items())
        b = sum(rows[m][1] * c for m, c in SUBSET.items())
        print(f"| `{ours}` vs PEFT `{ours}_svd` | {a:.1f} s | {b:.1f} s | {32 * a / 60:.1f} min vs "
              f"{32 * b / 60:.1f} min | {b / a:.1f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--entry-layers", type=int, default=2, help="layers run for the per-entry methods")
    parser.add_argument("--methods", help="comma-separated subset (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of the factor-space methods")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads for both tools (default: torch's choice)")
    parser.add_argument("--separate", action="store_true",
                        help="run each factor-space method in its own process (for peak memory)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    device = chosen_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker.split(","), args.layers, args.repeats, args.device)
        return
    print(f"torch {torch.__version__}, {device_label(device)}, load average {os.getloadavg()[0]:.1f}")
    methods = args.methods.split(",") if args.methods else [m.name for m in available_methods()]
    if not args.skip_methods:
        print(f"part 1: {SOURCES} sources of rank {RANK}, Llama-2-7B shapes, default parameters and rank policy")
        rows = part1(methods, args.layers, args.entry_layers, args.repeats, args.threads, args.separate, args.device)
        print_part1(rows, args.layers)
    if not args.skip_peft:
        part2({"ties": 0.2, "dare_ties": 0.5}, device)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
