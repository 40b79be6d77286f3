"""Merge quality on the CPU: normalized accuracy of every method on LoRAs trained for synthetic tasks.

The protocol mirrors the LoRA vision benchmark of the KnOTS, Iso and Core Space papers (a shared
encoder, one LoRA per task, frozen per-task heads, only the LoRAs merged), scaled down to minutes
on two CPU cores:

1. Pre-training: an MLP encoder (64 → 128 → 128 → 128 → 64, GELU) is trained briefly on a mixture
   of 8 generic classification tasks (x ~ N(0, I) on the first 32 coordinates, each labelled by
   a random "teacher" tanh network, one head per task). Its first-layer weights on the other 32
   coordinates are then zeroed: the base model is blind to half of the input space.
2. Tasks: T "datasets", each with its own input domain (a random 8-dimensional subspace, half in
   the seen and half in the unseen coordinates, plus noise) and its own teacher (4 classes). For
   each, a linear head is fitted on the frozen base encoder (the "zero-shot" accuracy), then
   frozen, and a rank-8 LoRA (α = 16) on every encoder layer is trained on that task alone (the
   "fine-tuned" accuracy).
3. Merge: every registered method merges the T LoRAs (weights 1, default parameters); the merged
   update is added to the encoder and each task is evaluated with its own head. Normalized
   accuracy = merged accuracy ÷ fine-tuned accuracy, averaged over tasks, on held-out test data.

λ (the global scale of the merged update) is reported at 1 (no validation data) and tuned on a
validation split over a grid (as the papers do; for a sum of T LoRAs it is typically ≈ 1/T).
Every method's λ scales its output linearly and rank policies are scale-invariant, so one merge
per method serves the whole grid. Results are at full rank (no truncation, as the papers
evaluate) and with loramerge's default rank policy (per-entry methods re-ranked to the source
rank), averaged over ``--seeds`` independent runs (pre-training, tasks and LoRAs all re-drawn).
Published LoRA results order the methods TA ≈ TIES ≈ DARE-TIES < KnOTS-TIES < TSV / Iso-C /
Iso-CTS / Core Space (KnOTS ICLR 2025, Iso ICML 2025, Core Space NeurIPS 2025).

    python benchmarks/quality.py                 # 6 tasks, 3 seeds: about 5-12 minutes on 2 cores
    python benchmarks/quality.py --tasks 4 --seeds 1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import add_device_argument, chosen_device, device_label

import loramerge
from loramerge.core.adapter import Adapter, LowRank
from loramerge.merge.methods import available_methods

DIM, SEEN, HIDDEN, FEATURES, CLASSES, RANK, ALPHA = 64, 32, 128, 64, 4, 8, 16
LAYERS = ("fc1", "fc2", "fc3", "fc4")
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.fc3, self.fc4 = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, FEATURES)

    def forward(self, x: torch.Tensor, deltas: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        for i, name in enumerate(LAYERS):
            layer = getattr(self, name)
            weight = layer.weight if deltas is None or name not in deltas else layer.weight + deltas[name]
            x = nn.functional.linear(x, weight, layer.bias)
            if i < len(LAYERS) - 1:
                x = nn.functional.gelu(x)
        return x


def orthonormal_rows(g: torch.Generator, rows: int, coords: slice) -> torch.Tensor:
    """``rows`` orthonormal directions of R^DIM supported on ``coords``."""
    span = coords.stop - coords.start
    Q = torch.linalg.qr(torch.randn(span, rows, generator=g, dtype=torch.float64))[0].T.float()
    out = torch.zeros(rows, DIM)
    out[:, coords] = Q
    return out


def teacher(g: torch.Generator, readout: torch.Tensor):
    """Labels = argmax of a random tanh network of the projection ``readout @ x``."""
    W1, b1 = torch.randn(16, readout.shape[0], generator=g), torch.randn(16, generator=g) * 0.5
    W2 = torch.randn(CLASSES, 16, generator=g)
    return lambda x: (torch.tanh((x @ readout.T) @ W1.T + b1) @ W2.T).argmax(-1)


def dataset(seed: int, size: int, label, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I) labelled by ``label(x)``, or a task domain: x = basis·z + 0.1·noise labelled by ``label(z)``."""
    g = torch.Generator().manual_seed(seed)
    if basis is None:
        x = torch.randn(size, DIM, generator=g)
        x[:, SEEN:] = 0.0
        return x, label(x)
    z = torch.randn(size, basis.shape[1], generator=g)
    return z @ basis.T + 0.1 * torch.randn(size, DIM, generator=g), label(z)


def train(params, loss_fn, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(step).backward()
        opt.step()


def accuracy(encoder: Encoder, head: nn.Linear, data, deltas=None) -> float:
    x, y = data
    with torch.no_grad():
        return float((head(encoder(x, deltas)).argmax(-1) == y).float().mean())


def pretrain(seed: int, steps: int) -> Encoder:
    torch.manual_seed(seed)
    encoder = Encoder()
    g = torch.Generator().manual_seed(5000 + seed)
    tasks = [dataset(1000 + seed * 100 + t, 4096, teacher(g, orthonormal_rows(g, 16, slice(0, SEEN))))
             for t in range(8)]
    heads = nn.ModuleList(nn.Linear(FEATURES, CLASSES) for _ in tasks)

    def loss(step: int) -> torch.Tensor:
        total = 0.0
        for (x, y), head in zip(tasks, heads):
            idx = torch.randint(len(x), (128,))
            total = total + nn.functional.cross_entropy(head(encoder(x[idx])), y[idx])
        return total / len(tasks)

    train([*encoder.parameters(), *heads.parameters()], loss, steps, 2e-3)
    with torch.no_grad():
        encoder.fc1.weight[:, SEEN:] = 0.0  # the base model never learned to read these inputs
    return encoder.requires_grad_(False)


def finetune_task(encoder: Encoder, task: int, seed: int, steps: int):
    """Linear probe on the frozen base, then a rank-8 LoRA on every layer with the head frozen."""
    g = torch.Generator().manual_seed(9000 + seed * 100 + task)
    basis = torch.cat([orthonormal_rows(g, 4, slice(0, SEEN)), orthonormal_rows(g, 4, slice(SEEN, DIM))]).T
    label = teacher(g, torch.eye(8))
    splits = {name: dataset(20000 + seed * 1000 + task * 10 + i, size, label, basis)
              for i, (name, size) in enumerate((("train", 32768), ("val", 1024), ("test", 2048)))}
    torch.manual_seed(seed * 100 + task)
    head = nn.Linear(FEATURES, CLASSES)
    x, y = splits["train"]

    def probe_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(x), (256,))
        return nn.functional.cross_entropy(head(encoder(x[idx])), y[idx])

    train(head.parameters(), probe_loss, steps // 2, 5e-3)
    head.requires_grad_(False)
    factors = {}
    for name in LAYERS:
        layer = getattr(encoder, name)
        A = (torch.randn(RANK, layer.in_features) / math.sqrt(layer.in_features)).requires_grad_()
        B = torch.zeros(layer.out_features, RANK, requires_grad=True)
        factors[name] = (A, B)
    scale = ALPHA / RANK

    def lora_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(x), (256,))
        deltas = {n: scale * (B @ A) for n, (A, B) in factors.items()}
        return nn.functional.cross_entropy(head(encoder(x[idx], deltas)), y[idx])

    train([p for pair in factors.values() for p in pair], lora_loss, steps, 5e-3)
    adapter = Adapter({n: LowRank(A.detach().clone(), B.detach().clone(), scale=scale) for n, (A, B) in factors.items()})
    return adapter, head, splits


def deltas_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {name: adapter.delta(name) for name in adapter.modules}


def run_seed(seed: int, tasks: int, pretrain_steps: int, finetune_steps: int, device: str = "auto") -> dict:
    start = time.perf_counter()
    encoder = pretrain(seed, pretrain_steps)
    trained = [finetune_task(encoder, t, seed, finetune_steps) for t in range(tasks)]
    adapters = [a for a, _, _ in trained]

    def accuracies(deltas, split: str) -> list[float]:
        return [accuracy(encoder, head, splits[split], deltas) for _, head, splits in trained]

    fine_tuned = {split: [accuracy(encoder, h, s[split], deltas_of(a)) for a, h, s in trained] for split in ("val", "test")}

    def normalized(deltas, split: str) -> float:
        return 100 * statistics.mean(a / f for a, f in zip(accuracies(deltas, split), fine_tuned[split]))

    zero_shot = accuracies(None, "test")
    print(f"seed {seed}: trained in {time.perf_counter() - start:.0f} s; test accuracy zero-shot "
          f"{statistics.mean(zero_shot):.3f}, fine-tuned {statistics.mean(fine_tuned['test']):.3f}", flush=True)
    results = {"zero-shot": {"full_lambda1": normalized(None, "test")}}
    for method in available_methods():
        if method.max_sources is not None and method.max_sources < tasks:
            continue
        row = {}
        for label, policy in (("full", {"rank": HIDDEN}), ("default", {})):  # rank HIDDEN never truncates
            if not method.accepts_rank and policy:
                continue
            merged = deltas_of(loramerge.merge(adapters, method=method.name, device=device, **policy))
            scores = {lam: {split: normalized({k: lam * v for k, v in merged.items()}, split) for split in ("val", "test")}
                      for lam in LAMBDAS}
            best = max(LAMBDAS, key=lambda lam: scores[lam]["val"])
            row |= {f"{label}_lambda1": scores[1.0]["test"], f"{label}_tuned": scores[best]["test"],
                    f"{label}_lambda": best}
        if "full_lambda1" not in row:  # cat takes no rank option: it is always exact
            row |= {k.replace("default", "full"): v for k, v in row.items()}
        results[method.name] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the model is tiny, and one thread is immune to other jobs)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = chosen_device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, merges on {device_label(device)} (training on the CPU), "
          f"load average {os.getloadavg()[0]:.1f}")
    runs = [run_seed(seed, args.tasks, args.pretrain_steps, args.finetune_steps, args.device) for seed in range(args.seeds)]

    def cell(name: str, key: str) -> str:
        values = [r[name][key] for r in runs if key in r[name]]
        if not values:
            return ""
        if key.endswith("_lambda"):
            return "/".join(f"{v:g}" for v in values)
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.1f}{spread}"

    print(f"\n{args.tasks} tasks, {args.seeds} seed(s); normalized test accuracy, % (merged ÷ fine-tuned; mean ± std)")
    print("| method | λ = 1, full rank | tuned λ, full rank | tuned λ, default rank policy | λ chosen (full rank) |")
    print("|---|---|---|---|---|")
    order = sorted((n for n in runs[0] if n != "zero-shot"), key=lambda n: -statistics.mean(r[n]["full_tuned"] for r in runs))
    print(f"| zero-shot (base encoder) | {cell('zero-shot', 'full_lambda1')} | | | |")
    for name in order:
        print(f"| `{name}` | {cell(name, 'full_lambda1')} | {cell(name, 'full_tuned')} | {cell(name, 'default_tuned')} | "
              f"{cell(name, 'full_lambda')} |")
    print(f"\ntotal time {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
