"""Folding and extraction on a multi-GB checkpoint: loramerge against PEFT, mergekit and the I/O floor.

Part 1 (fold) writes a synthetic Llama-shaped checkpoint (default 3.2 GB of bf16 in 4 shards,
under /tmp) and a rank-16 adapter on every linear layer, then folds it three ways, each in its
own subprocess so peak RSS is that tool's alone (``os.wait4`` gives the child's rusage):

- ``floor``: safetensors ``load_file`` + ``save_file`` of every shard, no maths (the I/O floor);
- ``loramerge``: ``loramerge.fold.engine``;
- ``peft``: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained``.

Part 2 (extract) builds a smaller pair with the same widths (default 4 layers, float32) whose
difference is a rank-64 update with a decaying spectrum plus noise, and extracts rank 16 with
``loramerge.extract`` and with mergekit's ``mergekit-extract-lora`` (if it is installed, e.g. in
a separate venv: ``python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install mergekit``),
reporting time, peak RSS and each result's relative error against the true difference.

    python benchmarks/fold.py                          # both parts, full size
    python benchmarks/fold.py --size-gb 1 --repeats 1  # quicker
    python benchmarks/fold.py --skip-fold --mergekit /tmp/mk-venv/bin/mergekit-extract-lora
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's loramerge, also in children

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
HEAD_DIM = HIDDEN // HEADS
LINEAR = {  # module → (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


# ---------------------------------------------------------------------------------------- inputs


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        shapes.append((f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)))
        shapes += [(f"model.layers.{i}.{m}.weight", s) for m, s in LINEAR.items()]
        shapes.append((f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)))
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return shapes


def layers_for(size_gb: float, itemsize: int) -> int:
    per_layer = sum(o * i for o, i in LINEAR.values()) * itemsize
    fixed = 2 * VOCAB * HIDDEN * itemsize
    return max(1, math.ceil((size_gb * 1e9 - fixed) / per_layer))


def write_model(folder: Path, layers: int, shards: int, dtype: torch.dtype, seed: int = 0,
                delta_rank: int = 0) -> None:
    """A transformers-loadable Llama checkpoint with random weights; ``delta_rank`` > 0 writes the
    "fine-tune" of the same seed: every linear weight plus a decaying rank-``delta_rank`` update and noise."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(layers)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    total = sum(math.prod(s) for _, s in shapes) * itemsize
    limit = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > limit * 1.01 and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            g = torch.Generator().manual_seed(seed * 100_003 + zlib.crc32(name.encode()) % 100_000)
            if len(shape) == 1:
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g) * (1.0 / math.sqrt(shape[1]))
                if delta_rank and "layers" in name:
                    t += low_rank_update(shape, delta_rank, name)
            tensors[name] = t.to(dtype)
            weight_map[name] = file_name
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def low_rank_update(shape: tuple[int, ...], rank: int, name: str) -> torch.Tensor:
    """σᵢ ∝ 0.85ⁱ on random orthonormal directions, about 5% of the weight's norm, plus 1% noise."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    out_f, in_f = shape
    U, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=g))
    V, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=g))
    sigma = 0.85 ** torch.arange(rank, dtype=torch.float32)
    update = (U * sigma) @ V.T
    weight_norm = math.sqrt(out_f)  # ‖W‖_F for entries of variance 1/in
    update *= 0.05 * weight_norm / float(update.norm())
    noise = torch.randn(shape, generator=g)
    return update + noise * (0.01 * weight_norm / float(noise.norm()))


def write_adapter(folder: Path, model: Path, layers: int, rank: int) -> None:
    from loramerge import Adapter, LowRank

    g = torch.Generator().manual_seed(1)
    modules = {}
    for i in range(layers):
        for m, (out_f, in_f) in LINEAR.items():
            A = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
            B = torch.randn(out_f, rank, generator=g) * 0.01
            modules[f"model.layers.{i}.{m}"] = LowRank(A, B, scale=2.0)
    Adapter(modules, base_model=str(model), task_type="CAUSAL_LM").save(folder, force=True)


# -------------------------------------------------------------------------------------- children


def child(kind: str, model: str, adapter: str, out: str, rank: int, device: str = "auto") -> None:
    """One measured run; prints its own timing (after imports) as JSON."""
    started = time.perf_counter()
    if kind == "floor":
        from safetensors.torch import load_file, save_file

        os.makedirs(out)
        for shard in sorted(Path(model).glob("*.safetensors")):
            tensors = load_file(str(shard))
            save_file(tensors, os.path.join(out, shard.name), metadata={"format": "pt"})
            del tensors
        for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
            shutil.copy(Path(model) / name, out)
    elif kind == "loramerge":
        import loramerge

        loramerge.fold(model, adapter, output=out, device=device)
    elif kind == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        shard = max(p.stat().st_size for p in Path(model).glob("*.safetensors"))
        merged.save_pretrained(out, max_shard_size=f"{math.ceil(shard / 1e6) + 1}MB")
    elif kind == "extract":
        import loramerge

        loramerge.extract(model, adapter, output=out, rank=rank, device=device)
    else:
        raise SystemExit(f"unknown child {kind}")
    print(json.dumps({"seconds": time.perf_counter() - started}))


# Linux carries the parent's peak RSS into a child's ru_maxrss across fork/vfork + exec, so this
# (large) process does not start the measured commands itself: a bare interpreter that imports
# nothing heavy does, and reports the child's own rusage.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
out = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"status": os.waitstatus_to_exitcode(status), "wall": time.perf_counter() - start,
                  "maxrss_kb": usage.ru_maxrss, "stdout": out}))
"""


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``argv`` through the launcher; its wall time (outside and, if printed, inside) and peak RSS."""
    with tempfile.TemporaryFile("w+") as errors:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], stdout=subprocess.PIPE, stderr=errors,
                              text=True, check=False, env={**os.environ, **(env or {})})
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"status": -1}
        if report["status"] != 0:
            errors.seek(0)
            tail = errors.read()[-3000:]
            raise RuntimeError(f"{' '.join(argv[:4])}… failed with status {report['status']}:\n{tail}")
    inner = report["wall"]
    for line in report["stdout"].splitlines()[::-1]:
        if line.startswith("{"):
            inner = json.loads(line)["seconds"]
            break
    return {"wall": report["wall"], "seconds": inner, "rss_gb": report["maxrss_kb"] * 1024 / 1e9}


def self_child(kind: str, model: Path, adapter: Path, out: Path, rank: int = 16, device: str = "auto") -> list[str]:
    return [sys.executable, __file__, "--child", kind, "--model", str(model), "--adapter", str(adapter),
            "--out", str(out), "--rank", str(rank), "--device", device]


# ------------------------------------------------------------------------------------------ parts


def compare_outputs(ours: Path, theirs: Path, layers: int) -> str:
    from safetensors import safe_open

    from loramerge.io.checkpoint import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    worst, differing, count = 0.0, 0, 0
    for i in (0, layers - 1):
        for m in LINEAR:
            name = f"model.layers.{i}.{m}.weight"
            x = a.read(name).float()
            with safe_open(str(b.tensors[name].shard), "pt") as fh:
                y = fh.get_tensor(name).float()
            ulp = y.abs().clamp_min(1e-30) * 2.0**-7
            worst = max(worst, float(((x - y).abs() / ulp).max()))
            differing += int((x != y).sum())
            count += x.numel()
    return f"loramerge vs PEFT on {2 * len(LINEAR)} weights: {differing / count:.3%} of entries differ, worst {worst:.2f} bf16 ulp"


def fold_part(args: argparse.Namespace, root: Path) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    layers = layers_for(args.size_gb, 2)
    model, adapter = root / "model", root / "adapter"
    started = time.perf_counter()
    write_model(model, layers, args.shards, dtype)
    write_adapter(adapter, model, layers, args.rank)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"fold: {layers} layers, {size / 1e9:.2f} GB in {len(list(model.glob('*.safetensors')))} shards "
          f"({args.dtype}), rank-{args.rank} adapter on {layers * len(LINEAR)} modules "
          f"(built in {time.perf_counter() - started:.0f}s)")
    kinds = ["floor", "loramerge"] + ([] if args.skip_peft else ["peft"])
    # (within each repeat the order alternates, so neither tool always runs on a warmer cache)
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for repeat in range(args.repeats):
        for kind in (kinds if repeat % 2 == 0 else [kinds[1], kinds[0], *kinds[2:]]):
            if kind == "peft" and repeat >= args.peft_repeats:
                continue
            out = root / f"out-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # every contender starts with no dirty pages of ours to write back
            results[kind].append(measure(self_child(kind, model, adapter, out, args.rank, args.device)))
            if kind == "floor":
                shutil.rmtree(out, ignore_errors=True)
        if repeat == 0 and "peft" in kinds:
            print(compare_outputs(root / "out-loramerge", root / "out-peft", layers))
        for kind in ("loramerge", "peft"):
            shutil.rmtree(root / f"out-{kind}", ignore_errors=True)
    print(f"{'contender':<12} {'runs':>4} {'seconds':>9} {'GB/s':>7} {'peak RSS GB':>12}")
    med = {}
    for kind, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["rss_gb"] for r in runs)
        med[kind] = (seconds, rss)
        print(f"{kind:<12} {len(runs):>4} {seconds:>9.2f} {size / seconds / 1e9:>7.2f} {rss:>12.2f}")
    ours, floor = med["loramerge"], med["floor"]
    pairs = sorted(f["seconds"] / o["seconds"] for f, o in zip(results["floor"], results["loramerge"]))
    print("per-repeat floor/loramerge: " + ", ".join(f"{p:.0%}" for p in pairs)
          + "  (the floor is memcpy-bound and swings with the page cache's writeback)")
    print(f"loramerge throughput = {floor[0] / ours[0]:.0%} of the I/O floor, median of repeats "
          f"{statistics.median(pairs):.0%} (target ≥ 50%)")
    if "peft" in med:
        peft = med["peft"]
        print(f"loramerge peak RSS = {ours[1] / peft[1]:.1%} of PEFT's (target ≤ 25%); "
              f"{peft[0] / ours[0]:.1f}x faster than PEFT")


def extract_part(args: argparse.Namespace, root: Path) -> None:
    from loramerge import load
    from loramerge.io.checkpoint import open_checkpoint

    layers = args.extract_layers
    base, ft = root / "x-base", root / "x-ft"
    write_model(base, layers, 2, torch.float32, seed=3)
    write_model(ft, layers, 2, torch.float32, seed=3, delta_rank=64)
    print(f"\nextract: {layers} layers × {len(LINEAR)} modules, float32, true update rank 64 (σᵢ ∝ 0.85ⁱ) + 1% noise;"
          f" rank {args.rank}")
    os.sync()
    runs = {"loramerge": measure(self_child("extract", base, ft, root / "x-ours", args.rank, args.device))}
    tool = args.mergekit or shutil.which("mergekit-extract-lora")
    if tool and Path(tool).exists():
        argv = [tool, "--model", str(ft), "--base-model", str(base), "--out-path", str(root / "x-mergekit"),
                "--max-rank", str(args.rank)]
        runs["mergekit"] = measure(argv)
        # OpenMP's spinning barriers make multi-threaded LAPACK very slow on busy cores; loramerge
        # leaves a core spare, so give mergekit the same chance with one thread.
        os.sync()
        argv[argv.index("--out-path") + 1] = str(root / "x-mergekit-1t")
        runs["mergekit-1t"] = measure(argv, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    else:
        print("mergekit-extract-lora not found; install it in a separate venv and pass --mergekit")
    b, f = open_checkpoint(base), open_checkpoint(ft)
    errors: dict[str, list[float]] = {k: [] for k in runs}
    optimal = []
    adapters = {k: load(root / f"x-{'ours' if k == 'loramerge' else k}") for k in runs}
    sizes = {k: sum(p.stat().st_size for p in (root / f"x-{'ours' if k == 'loramerge' else k}").iterdir())
             for k in runs}
    for i in range(layers):
        for m in LINEAR:
            module = f"model.layers.{i}.{m}"
            truth = f.read(module + ".weight").double() - b.read(module + ".weight").double()
            norm = float(truth.norm())
            for kind, adapter in adapters.items():
                got = adapter.delta(module, torch.float64) if module in adapter else torch.zeros_like(truth)
                errors[kind].append(float((truth - got).norm()) / norm)
            s = torch.linalg.svdvals(truth)
            optimal.append(math.sqrt(float(s[args.rank:].square().sum() / s.square().sum())))
    print(f"{'tool':<12} {'seconds':>9} {'peak RSS GB':>12} {'mean rel.err':>13} {'max rel.err':>12} {'output MB':>10}")
    for kind, r in runs.items():
        print(f"{kind:<12} {r['wall']:>9.2f} {r['rss_gb']:>12.2f} {statistics.mean(errors[kind]):>13.4f} "
              f"{max(errors[kind]):>12.4f} {sizes[kind] / 1e6:>10.1f}")
    print(f"{'optimal':<12} {'':>9} {'':>12} {statistics.mean(optimal):>13.4f} {max(optimal):>12.4f}"
          "   (exact truncated SVD)")
    if "mergekit" in runs:
        best = min(runs["mergekit"]["wall"], runs["mergekit-1t"]["wall"])
        print(f"loramerge is {best / runs['loramerge']['wall']:.1f}x faster than mergekit-extract-lora (its faster run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.2, help="fold checkpoint size (default 3.2)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of floor and loramerge (median)")
    parser.add_argument("--peft-repeats", type=int, default=1, help="runs of PEFT (slow)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-fold", action="store_true")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--extract-layers", type=int, default=4)
    parser.add_argument("--mergekit", help="path of mergekit-extract-lora (e.g. /tmp/mk-venv/bin/mergekit-extract-lora)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir in /tmp)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto",
                        help="loramerge's compute device: auto (CUDA when available, else CPU), cpu, cuda[:N]; "
                             "PEFT and mergekit run on the CPU")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.adapter, args.out, args.rank, args.device)
        return
    root = Path(tempfile.mkdtemp(prefix="loramerge-fold-bench-", dir=args.workdir))
    try:
        if not args.skip_fold:
            fold_part(args, root)
        if not args.skip_extract:
            extract_part(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
