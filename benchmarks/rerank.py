"""SVD re-rank of a weighted LoRA sum: loramerge's factored SVD against PEFT's add_weighted_adapter(svd).

Part 1 runs both tools in this process on the same adapters (default: 2 layers of 4096×4096,
3 adapters of rank 16) and reports the speed ratio and each tool's relative error against the
dense float64 truncated SVD of the exact sum.

Part 2 times a whole Llama-2-7B-shaped merge (32 layers × q, k, v, o, gate, up, down, rank 16,
3 sources, svd) from disk to disk, against the time to only read the sources (every byte) and
write a result of the same size.

    python benchmarks/rerank.py                 # both parts, full size
    python benchmarks/rerank.py --size 1024     # quicker part 1
    python benchmarks/rerank.py --skip-llama
    python benchmarks/rerank.py --device cuda     # both tools on the GPU (default: auto)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch
from common import (
    LLAMA_SHAPES,
    add_device_argument,
    chosen_device,
    device_label,
    llama_adapter,
    synchronize,
    timed,
)
from torch import nn

import loramerge
from loramerge.core.adapter import Adapter, LowRank


class Stack(nn.Module):
    def __init__(self, size: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(size, size, bias=False) for _ in range(layers))


def peft_sources(size: int, layers: int, sources: int, rank: int):
    """A PEFT model with ``sources`` random adapters of ``rank`` (alphas differ), plus the same as Adapters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = [f"layers.{i}" for i in range(layers)]
    model = get_peft_model(Stack(size, layers), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                           init_lora_weights=False), adapter_name="s0")
    for s in range(1, sources):
        model.add_adapter(f"s{s}", LoraConfig(r=rank, lora_alpha=rank * (s + 1), target_modules=targets,
                                               init_lora_weights=False))
    adapters = []
    with torch.no_grad():
        for s in range(sources):
            layers_ = {}
            for i in range(layers):
                layer = model.base_model.model.layers[i]
                layer.lora_A[f"s{s}"].weight.normal_(0, 1 / size**0.5)
                layer.lora_B[f"s{s}"].weight.normal_(0, 0.02)
                layers_[f"layers.{i}"] = LowRank(layer.lora_A[f"s{s}"].weight.clone(),
                                                 layer.lora_B[f"s{s}"].weight.clone(), layer.scaling[f"s{s}"])
            adapters.append(Adapter(layers_))
    return model, adapters


def truncated_reference(adapters: list[Adapter], weights: list[float], module: str, rank: int) -> torch.Tensor:
    exact = sum(w * a.delta(module, torch.float64) for a, w in zip(adapters, weights))
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def part1(size: int, layers: int, sources: int, rank: int, repeats: int, skip_peft: bool, device: torch.device) -> None:
    weights = [0.6, 0.3, -0.2, 0.5, 0.4][:sources]
    model, adapters = peft_sources(size, layers, sources, rank)
    ours_t, merged = timed(lambda: loramerge.merge(adapters, method="svd", weights=weights, rank=rank, device=device),
                           repeats)
    refs = {m: truncated_reference(adapters, weights, m, rank) for m in merged.modules}
    ours_err = max(rel(merged.delta(m), refs[m]) for m in merged.modules)
    print(f"part 1: {layers} layers of {size}×{size}, {sources} adapters of rank {rank}, svd to rank {rank}")
    print(f"  loramerge factored SVD : {ours_t * 1000:9.1f} ms (median of {repeats})   max rel. error {ours_err:.1e}")
    if skip_peft:
        return
    peft_model = copy.deepcopy(model).to(device)
    start = time.perf_counter()
    peft_model.add_weighted_adapter([f"s{s}" for s in range(sources)], weights, "merged",
                                    combination_type="svd", svd_rank=rank)
    synchronize()
    peft_t = time.perf_counter() - start
    peft_err = max(
        rel(peft_model.base_model.model.get_submodule(m).get_delta_weight("merged").detach().cpu(), refs[m])
        for m in merged.modules
    )
    print(f"  PEFT add_weighted_adapter(svd): {peft_t * 1000:9.1f} ms (1 run)   max rel. error {peft_err:.1e}")
    print(f"  speed-up: {peft_t / ours_t:.0f}×  (target ≥ 1000×, error ≤ 1e-5)")


def part2(rank: int, sources: int, layers: int, repeats: int, device: torch.device) -> None:
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as tmp:
        root = Path(tmp)
        paths = [llama_adapter(s, layers, rank=rank).save(root / f"src{s}") for s in range(sources)]
        size_mb = sum(p.stat().st_size for d in paths for p in d.iterdir()) / 1e6
        weights = [1.0 / sources] * sources

        def io_only():
            loaded = [loramerge.load(p) for p in paths]
            # Loading maps the files lazily; touching every tensor makes the floor really read them.
            for adapter in loaded:
                for module in adapter.modules:
                    float(adapter[module].A.sum() + adapter[module].B.sum())
            loaded[0].save(root / "io-out", force=True)

        def full_merge():
            loaded = [loramerge.load(p) for p in paths]
            loramerge.merge(loaded, method="svd", weights=weights, rank=rank, device=device).save(
                root / "merge-out", force=True)

        io_t, _ = timed(io_only, repeats)
        merge_t, _ = timed(full_merge, repeats)
        modules = layers * len(LLAMA_SHAPES)
        print(f"part 2: Llama-2-7B shape, {layers} layers × 7 modules = {modules} modules, {sources} sources "
              f"of rank {rank} ({size_mb:.0f} MB), svd to rank {rank}")
        print(f"  read sources + write output only: {io_t:6.2f} s (median of {repeats})")
        print(f"  load + merge (svd) + save        : {merge_t:6.2f} s (median of {repeats})")
        print(f"  ratio: {merge_t / io_t:.2f}×  (target ≤ 2×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llama-layers", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads for both tools (default: torch's choice)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    add_device_argument(parser)
    args = parser.parse_args()
    device = chosen_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {device_label(device)}, load average {os.getloadavg()[0]:.1f}")
    part1(args.size, args.layers, args.sources, args.rank, args.repeats, args.skip_peft, device)
    if not args.skip_llama:
        part2(args.rank, args.sources, args.llama_layers, max(3, args.repeats // 2), device)


if __name__ == "__main__":
    main()
