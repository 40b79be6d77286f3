"""Resize an SDXL LoRA: loramerge's factored SVD against kohya's ``resize_lora.py`` approach.

The LoRA is shaped like a kohya SDXL LoRA (the same 986 modules as ``sd_merge.py``: the UNet's
attention/projection/feed-forward linears and the text encoders' attention/MLP linears, shapes
from loramerge's SDXL tables) at rank 64, with a power-law spectrum per module (the i-th
direction has weight 1/(i+1)), as trained LoRAs roughly have, so the dynamic policies pick
different ranks per module.

The baseline re-implements the approach ``resize_lora.py`` takes, from its algorithm (see
reference/sd-ecosystem.md and the script's documented index rules, not its code): per module the
dense ΔW = up @ down in float32, a full ``torch.linalg.svd`` (``full_matrices=True``, its
default), the rank from the dynamic rule — ``sv_ratio``: the count of σ > σ₁/R; ``sv_cumulative``:
the first index where Σσ reaches F; ``sv_fro``: the first index where Σσ² reaches F² — clamped to
[1, len(S) − 1] and then plus one, capped at ``--new_rank``; then U·diag(S) and Vh truncated.
loramerge keeps the smallest rank meeting each criterion (kohya's rank − 1, unless a cap binds).

A dense full SVD of every SDXL module takes far too long on a small CPU, so the baseline is timed
on one module of each of the 12 distinct shapes and extrapolated by the module count of each
shape (printed as such); loramerge is timed on the same subset and on the whole set.

Error is ‖ΔW_resized − ΔW‖_F / ‖ΔW‖_F against the source's exact ΔW (float64), with the optimum
of each rank (Eckart–Young) printed too.

    python benchmarks/sd_resize.py                     # rank 64 → rank 16, sv_fro 0.9, sv_ratio 8, sv_cumulative 0.7
    python benchmarks/sd_resize.py --repeats 1 --device cuda
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from common import add_device_argument, chosen_device, device_label, timed
from sd_merge import sdxl_targets

import loramerge
from loramerge.core.adapter import Adapter, LowRank

ALPHA = 32.0


def power_law_lora(targets: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    decay = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    layers = {}
    for module, (out_f, in_f) in targets.items():
        down = torch.randn(rank, in_f, generator=g) / in_f**0.5
        up = torch.randn(out_f, rank, generator=g) * 0.05 * decay
        layers[module] = LowRank(down, up, scale=ALPHA / rank, alpha=ALPHA)
    return Adapter(layers, config={"architectures": ["sdxl"]})


def kohya_index(sigma: torch.Tensor, method: str | None, param: float, new_rank: int) -> int:
    """``rank_resize``'s choice: the dynamic index (clamped to [1, len(sigma) − 1]) plus one, capped at new_rank."""
    if method is None:
        return new_rank
    if method == "sv_ratio":
        threshold = sigma[0] / param
        index = int(torch.sum(sigma > threshold))
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(sigma, 0) / sigma.sum(), torch.tensor(param))) + 1
    else:  # sv_fro
        index = int(torch.searchsorted(torch.cumsum(sigma**2, 0) / (sigma**2).sum(), torch.tensor(param**2))) + 1
    index = max(1, min(index, len(sigma) - 1))
    return min(index + 1, new_rank)


def kohya_svd(lora: Adapter, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expensive part of the resize_lora approach: the dense ΔW and its full SVD."""
    lr = lora[module]
    return torch.linalg.svd(lr.B @ lr.A)  # the scale travels in alpha, as in kohya's files


def kohya_truncate(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scale: float, method: str | None,
                   param: float, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank rule, then U·diag(S) and Vh truncated."""
    U, S, Vh = svd
    k = kohya_index(S, method, param, new_rank)
    return (U[:, :k] @ torch.diag(S[:k])) * scale, Vh[:k]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def optimum(ref: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(ref)
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


POLICIES = [("rank 16", None, 16.0, {"rank": 16}), ("sv_fro 0.9", "sv_fro", 0.9, {"sv_fro": 0.9}),
            ("sv_ratio 8", "sv_ratio", 8.0, {"sv_ratio": 8.0}),
            ("sv_cumulative 0.7", "sv_cumulative", 0.7, {"sv_cumulative": 0.7})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64, help="rank of the source LoRA")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (median); baseline: max(1, repeats-1)")
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's choice)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = chosen_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, loramerge on {device_label(device)} (the kohya approach on the CPU), "
          f"load average {os.getloadavg()[0]:.1f}")
    targets = sdxl_targets()
    lora = power_law_lora(targets, args.rank)
    counts = Counter(targets.values())
    subset = [next(m for m, s in targets.items() if s == shape) for shape in counts]
    print(f"SDXL LoRA: {len(targets)} modules, rank {args.rank}, alpha {ALPHA:g}, σᵢ ∝ 1/(i+1); "
          f"{len(counts)} distinct shapes; kohya's --new_rank (the cap) = {args.rank}")
    sub = lora.with_layers({m: lora[m] for m in subset})
    exact = {m: lora.delta(m, torch.float64) for m in subset}

    # kohya's approach: one dense ΔW and full SVD per module whatever the policy (the rank rule is free).
    base_repeats = max(1, args.repeats - 1)
    per_shape: dict[tuple[int, int], float] = {}
    svds = {}
    for m in subset:
        per_shape[targets[m]], svds[m] = timed(lambda m=m: kohya_svd(sub, m), base_repeats, warmup=False)
    kohya_sub = sum(per_shape.values())
    extrapolated = sum(per_shape[s] * n for s, n in counts.items())
    print(f"kohya's approach (dense ΔW + full SVD per module): {kohya_sub:.1f} s for the {len(subset)}-module subset "
          f"(median of {base_repeats}), extrapolated to all {len(targets)} modules: {extrapolated / 60:.1f} min")
    print(f"  {'shape':>12} {'count':>5} {'kohya per module':>17}")
    for shape, n in counts.most_common():
        print(f"  {shape!s:>12} {n:>5} {per_shape[shape]:>15.2f} s")

    header = (f"{'policy':<18} {'loramerge all':>14} {'subset':>8} {'speed-up':>9} {'Σrank ours':>11} "
              f"{'Σrank kohya':>12} {'max err ours':>13} {'max err kohya':>14} {'max |ours−opt|':>15}")
    print("\n" + header)
    for label, method, param, options in POLICIES:
        cap = int(param) if method is None else args.rank  # kohya's --new_rank: the rank, or the dynamic cap
        full_t, full = timed(lambda options=options: loramerge.resize(lora, device=device, **options), args.repeats)
        sub_t, ours = timed(lambda options=options: loramerge.resize(sub, device=device, **options), args.repeats)
        theirs = {m: kohya_truncate(svds[m], lora[m].scale, method, param, cap) for m in subset}
        # Ranks over the whole set: ours measured; kohya's from its rule on each module's spectrum (the
        # factored spectrum padded with the zeros the dense one has).
        ours_total = sum(lr.rank for lr in full.layers.values())
        kohya_total = 0
        for m in targets:
            S = torch.cat([_spectrum(lora[m]), torch.zeros(min(targets[m]) - args.rank)])
            kohya_total += kohya_index(S, method, param, cap)
        err_ours = [rel(ours.delta(m, torch.float64), exact[m]) for m in subset]
        err_kohya = [rel(theirs[m][0].double() @ theirs[m][1].double(), exact[m]) for m in subset]
        gap = max(abs(e - optimum(exact[m], ours[m].rank)) for e, m in zip(err_ours, subset))
        print(f"{label:<18} {full_t:>12.2f} s {sub_t * 1000:>5.0f} ms {extrapolated / full_t:>8.0f}x {ours_total:>11} "
              f"{kohya_total:>12} {max(err_ours):>13.4f} {max(err_kohya):>14.4f} {gap:>15.1e}")
    print("\nspeed-up = kohya's approach extrapolated to the whole set / loramerge measured on the whole set; "
          "errors are the maxima over the 12 shapes;\n|ours−opt| is loramerge's excess error over the best "
          "approximation of the rank it kept.")


def _spectrum(lr: LowRank) -> torch.Tensor:
    from loramerge.core.linalg import factored_svd

    B, A = lr.matrices(torch.float64)
    return factored_svd(B, A).S.float()


if __name__ == "__main__":
    main()
