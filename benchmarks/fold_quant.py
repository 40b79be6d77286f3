"""Folding into quantized bases: plain bf16 vs QLoRA's dequant(quant(W)) vs a pre-quantized NF4 checkpoint.

Writes the synthetic Llama-shaped bf16 checkpoint of ``benchmarks/fold.py`` (default 2.2 GB in 3
shards) and a rank-16 adapter on every linear layer, makes a pre-quantized bitsandbytes NF4 copy
(in transformers' serialized layout, by ``loramerge.io.quant.write``; transformers loads it, see
``tests/test_fold_quant.py``), then measures, each in its own subprocess (peak RSS is the child's
own):

- ``floor``: safetensors ``load_file`` + ``save_file`` of every bf16 shard, no maths;
- ``plain``: ``loramerge.fold`` into the bf16 base;
- ``base_quant``: the same with ``base_quant="nf4"`` (every linear weight becomes dequant(quant(W))),
  with loramerge's cache off: transformers is imported to say which modules it quantizes;
- ``base_quant_cached``: the same, with that answer already in loramerge's cache (any fold after the
  first of the same base): transformers is not imported;
- ``base_quant_warm``: cache off, timed after importing transformers' Llama class: the streaming alone;
- ``prequantized``: ``loramerge.fold`` from the NF4 checkpoint (dequantized on the fly, written in bf16).

The target is at most 1.5× the plain fold's time with the same memory bound.

    python benchmarks/fold_quant.py                       # 2.2 GB, 3 repeats
    python benchmarks/fold_quant.py --size-gb 1 --repeats 1 --double-quant
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fold as fold_bench  # benchmarks/fold.py: the synthetic model, adapter and measurement

KINDS = ("floor", "plain", "base_quant", "base_quant_cached", "base_quant_warm", "prequantized")
QUANTIZED = KINDS[2:]


def child(kind: str, model: str, adapter: str, out: str, device: str, double_quant: bool) -> None:
    if kind in ("base_quant", "base_quant_warm"):  # the run() filled the cache; these ask transformers again
        os.environ["LORAMERGE_CACHE"] = "off"
    if kind == "base_quant_warm":  # transformers and the model class imported before the clock starts
        import transformers

        _ = transformers.LlamaForCausalLM
    started = time.perf_counter()
    if kind == "floor":
        fold_bench.child("floor", model, adapter, out, 16)
        return
    import loramerge

    spec = loramerge.BaseQuant("nf4", double_quant=double_quant) if kind.startswith("base_quant") else None
    loramerge.fold(model, adapter, output=out, device=device, base_quant=spec)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def make_prequantized(model: Path, out: Path, double_quant: bool) -> None:
    from loramerge.io.quant.targets import bnb_targets
    from loramerge.io.quant.write import Scheme, bnb4_config, quantize_folder

    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    targets = bnb_targets(config, names)
    quantize_folder(out, dict.fromkeys(targets.weights, Scheme("bnb4", "nf4", 64, double_quant)),
                    bnb4_config("nf4", double_quant, torch.bfloat16, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.2)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--double-quant", action="store_true", help="NF4 with double-quantized scales")
    parser.add_argument("--device", default="cpu", help="fold device (cpu, cuda, auto)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.adapter, args.out, args.device, args.double_quant)
        return
    root = Path(tempfile.mkdtemp(prefix="loramerge-fold-quant-", dir=args.workdir))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> None:
    layers = fold_bench.layers_for(args.size_gb, 2)
    os.environ["LORAMERGE_CACHE"] = str(root / "cache")  # filled by make_prequantized, read by base_quant_cached
    model, adapter, nf4 = root / "model", root / "adapter", root / "nf4"
    started = time.perf_counter()
    fold_bench.write_model(model, layers, args.shards, torch.bfloat16)
    fold_bench.write_adapter(adapter, model, layers, args.rank)
    make_prequantized(model, nf4, args.double_quant)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    nf4_size = sum(p.stat().st_size for p in nf4.glob("*.safetensors"))
    print(f"{layers} layers, {size / 1e9:.2f} GB bf16 in {args.shards} shards; NF4 copy {nf4_size / 1e9:.2f} GB "
          f"(double quant {args.double_quant}); rank-{args.rank} adapter on {layers * len(fold_bench.LINEAR)} modules "
          f"(built in {time.perf_counter() - started:.0f}s); device {args.device}")
    results: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for repeat in range(args.repeats):
        order = KINDS if repeat % 2 == 0 else KINDS[::-1]
        for kind in order:
            out = root / f"out-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            base = nf4 if kind == "prequantized" else model
            argv = [sys.executable, __file__, "--child", kind, "--model", str(base), "--adapter", str(adapter),
                    "--out", str(out), "--device", args.device] + (["--double-quant"] if args.double_quant else [])
            results[kind].append(fold_bench.measure(argv))
            shutil.rmtree(out, ignore_errors=True)
    print(f"{'contender':<17} {'runs':>4} {'seconds':>9} {'GB/s out':>9} {'peak RSS GB':>12} {'× plain':>8}")
    plain = statistics.median(r["seconds"] for r in results["plain"])
    for kind, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["rss_gb"] for r in runs)
        print(f"{kind:<17} {len(runs):>4} {seconds:>9.2f} {size / seconds / 1e9:>9.2f} {rss:>12.2f} "
              f"{seconds / plain:>8.2f}")
    for kind in QUANTIZED:
        ratios = [r["seconds"] / p["seconds"] for r, p in zip(results[kind], results["plain"])]
        print(f"{kind}: {statistics.median(ratios):.2f}× the plain fold's time (per repeat: "
              + ", ".join(f"{x:.2f}" for x in ratios) + "; target ≤ 1.5×)")


if __name__ == "__main__":
    main()
