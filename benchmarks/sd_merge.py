"""SVD merge of SDXL LoRAs: loramerge's factored SVD against kohya's ``svd_merge_lora`` approach.

The LoRA set is shaped like a kohya SDXL LoRA: every module kohya's default network targets,
with shapes from loramerge's SDXL tables — the UNet's 722 attention/projection/feed-forward
linears and the 264 attention/MLP linears of the two text encoders (986 modules). Each source
has rank 32 and its own alpha; the ratios include a negative one.

The baseline re-implements the approach ``svd_merge_lora.py`` takes (from its description in
reference/sd-ecosystem.md §2.3, not its code): per module the dense ΔW = Σ ratio·(alpha/r)·up@down
in float32, a full ``torch.linalg.svd`` (``full_matrices=True``, its default), all singular
values onto ``up``, then both factors clamped to ± the 0.99 quantile of their entries.

A dense full SVD of all 986 SDXL modules takes hours on a small CPU, so the baseline is timed
on one module of each of the 12 distinct shapes and extrapolated by the module count of each
shape (printed as such). loramerge is timed on the same subset and on the whole set.

Error is ‖ΔW_merged − ΔW_exact‖_F / ‖ΔW_exact‖_F against the exact weighted sum (float64), at
the target rank (where truncation is unavoidable: the optimum is printed too) and at rank Σ rᵢ
(where an exact result exists and only the clamp stands in the way).

    python benchmarks/sd_merge.py                     # 3 LoRAs, rank 32
    python benchmarks/sd_merge.py --loras 2 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import resource
from collections import Counter

import torch
from common import add_device_argument, chosen_device, device_label, timed

import loramerge
from loramerge.core.adapter import Adapter, LowRank
from loramerge.io.formats.sd_names import ARCHITECTURES

RATIOS = [0.8, 0.6, -0.4, 0.5]
ALPHAS = [16.0, 32.0, 8.0, 1.0]
CLAMP_QUANTILE = 0.99


def sdxl_targets() -> dict[str, tuple[int, int]]:
    """kohya's default SDXL LoRA targets: Transformer2DModel linears and the CLIP attention/MLP linears."""
    shapes = ARCHITECTURES["sdxl"].shapes
    return {m: s for m, s in shapes.items()  # type: ignore[misc]
            if ".attentions." in m or (m.startswith("text_encoder") and (".self_attn." in m or ".mlp." in m))}


def make_loras(targets: dict[str, tuple[int, int]], count: int, rank: int) -> list[Adapter]:
    loras = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        layers = {}
        for module, (out_f, in_f) in targets.items():
            down = torch.randn(rank, in_f, generator=g) / in_f**0.5
            up = torch.randn(out_f, rank, generator=g) * 0.05
            layers[module] = LowRank(down, up, scale=ALPHAS[i] / rank, alpha=ALPHAS[i])
        loras.append(Adapter(layers))
    return loras


def kohya_svd_merge(loras: list[Adapter], ratios: list[float], modules: list[str], rank: int,
                    clamp: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The svd_merge_lora approach: every dense ΔW first, then a full SVD and a quantile clamp per module."""
    dense: dict[str, torch.Tensor] = {}
    for lora, ratio in zip(loras, ratios):
        for m in modules:
            lr = lora[m]
            delta = ratio * (lr.B @ lr.A) * (lr.alpha / lr.rank)
            dense[m] = dense[m] + delta if m in dense else delta
    out = {}
    for m, mat in dense.items():
        k = min(rank, *mat.shape)
        U, S, Vh = torch.linalg.svd(mat)
        U = U[:, :k] @ torch.diag(S[:k])
        Vh = Vh[:k, :]
        if clamp:
            hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), CLAMP_QUANTILE)
            U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        out[m] = (U, Vh)
    return out


def exact_sum(loras: list[Adapter], ratios: list[float], module: str) -> torch.Tensor:
    return sum(r * lora.delta(module, torch.float64) for lora, r in zip(loras, ratios))


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def optimum(ref: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(ref)
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (median); baseline: max(1, repeats-1)")
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's choice)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = chosen_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"torch {torch.__version__}, loramerge on {device_label(device)} (the kohya approach on the CPU), "
          f"load average {os.getloadavg()[0]:.1f}")

    targets = sdxl_targets()
    ratios = RATIOS[:args.loras]
    loras = make_loras(targets, args.loras, args.rank)
    counts = Counter(targets.values())
    subset = [next(m for m, s in targets.items() if s == shape) for shape in counts]
    dense_gib = sum(o * i * 4 for o, i in targets.values()) / 2**30
    print(f"SDXL LoRA set: {len(targets)} modules ({sum(m.startswith('unet.') for m in targets)} UNet, "
          f"{sum(m.startswith('text_encoder') for m in targets)} text encoder), {len(counts)} distinct shapes; "
          f"{args.loras} LoRAs of rank {args.rank}, ratios {ratios}, alphas {ALPHAS[:args.loras]}")

    # Whole set, loramerge only.
    full_t, _ = timed(lambda: loramerge.merge(loras, method="svd", weights=ratios, rank=args.rank, device=device),
                      args.repeats)
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nloramerge svd, all {len(targets)} modules: {full_t:.2f} s (median of {args.repeats}); "
          f"process peak RSS {rss_ours:.2f} GiB (after setup {rss0:.2f} GiB; the sources alone are "
          f"{sum(a.parameter_count() for a in loras) * 4 / 2**30:.2f} GiB)")
    print(f"kohya's approach holds every dense ΔW before its SVDs: {dense_gib:.1f} GiB for this set (not run in full)")

    # Representative subset: one module per distinct shape, side by side.
    sub = [a.with_layers({m: a[m] for m in subset}) for a in loras]
    ours_sub_t, ours_sub = timed(
        lambda: loramerge.merge(sub, method="svd", weights=ratios, rank=args.rank, device=device), args.repeats)
    base_repeats = max(1, args.repeats - 1)
    per_shape: dict[tuple[int, int], float] = {}
    kohya_out = {}
    for m in subset:
        t, out = timed(lambda m=m: kohya_svd_merge(sub, ratios, [m], args.rank), base_repeats, warmup=False)
        per_shape[targets[m]] = t
        kohya_out.update(out)
    kohya_sub_t = sum(per_shape.values())
    extrapolated = sum(per_shape[s] * n for s, n in counts.items())
    print(f"\nsubset, one module of each shape ({len(subset)} modules):")
    print(f"  {'shape':>12} {'count':>5} {'kohya approach':>15} ")
    for shape, n in counts.most_common():
        print(f"  {shape!s:>12} {n:>5} {per_shape[shape]:>13.2f} s")
    print(f"  kohya approach: {kohya_sub_t:.2f} s (median of {base_repeats} per module); loramerge: "
          f"{ours_sub_t * 1000:.1f} ms (median of {args.repeats})  ->  {kohya_sub_t / ours_sub_t:.0f}x")
    print(f"  whole set: kohya approach extrapolated {extrapolated / 60:.1f} min (Σ count × time per shape), "
          f"loramerge measured {full_t:.2f} s  ->  {extrapolated / full_t:.0f}x faster (target >= 100x)")

    # Error against the exact sum.
    full_rank = args.rank * args.loras
    ours_exact = loramerge.merge(sub, method="svd", weights=ratios, rank=full_rank, device=device)
    kohya_exact = {}
    for m in subset:
        kohya_exact.update(kohya_svd_merge(sub, ratios, [m], full_rank))
    rows: dict[str, list[float]] = {k: [] for k in ("loramerge", "kohya", "optimum", "loramerge_full", "kohya_full")}
    for m in subset:
        ref = exact_sum(sub, ratios, m)
        rows["optimum"].append(optimum(ref, args.rank))
        rows["loramerge"].append(rel(ours_sub.delta(m, torch.float64), ref))
        U, Vh = kohya_out[m]
        rows["kohya"].append(rel(U.double() @ Vh.double(), ref))
        rows["loramerge_full"].append(rel(ours_exact.delta(m, torch.float64), ref))
        U, Vh = kohya_exact[m]
        rows["kohya_full"].append(rel(U.double() @ Vh.double(), ref))
    print(f"\nrelative Frobenius error against the exact weighted sum (max over the {len(subset)} shapes):")
    print(f"  rank {args.rank}: loramerge {max(rows['loramerge']):.4f}, kohya approach {max(rows['kohya']):.4f}, "
          f"optimum (Eckart–Young) {max(rows['optimum']):.4f}")
    excess = max(k - o for k, o in zip(rows["kohya"], rows["optimum"]))
    ours_excess = max(abs(k - o) for k, o in zip(rows["loramerge"], rows["optimum"]))
    print(f"           excess over the optimum: loramerge {ours_excess:.1e}, kohya approach {excess:.1e}")
    print(f"  rank {full_rank} (= Σ rᵢ, an exact result exists): loramerge {max(rows['loramerge_full']):.1e}, "
          f"kohya approach {max(rows['kohya_full']):.1e} (the 0.99-quantile clamp)")


if __name__ == "__main__":
    main()
