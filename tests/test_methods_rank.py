"""Rank policies apply to every method, per module, with the achieved error measured and written through rank_pattern."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import loramerge
from loramerge.core.linalg import full_left_spectrum
from loramerge.core.rank import RankPolicy, truncate_dense
from loramerge.merge.methods import available_methods, get_method
from loramerge.merge.methods.sparsify import magnitude
from tests.method_fixtures import module_inputs, random_adapter, random_statistics, relative_error, run_method
from tests.peft_fixtures import peft_deltas

WEIGHTS = [0.7, -0.4, 1.3]


@pytest.fixture(scope="module")
def sources():
    return [random_adapter(1, rank=4, scale=0.5), random_adapter(2, rank=6, scale=2.0), random_adapter(3, rank=3)]


def methods_and_sources(sources):
    for method in available_methods():
        if method.accepts_rank:
            yield method.name, (sources[:2] if method.max_sources == 2 else sources)


@pytest.mark.parametrize("policy", [{"rank": 2}, {"energy": 0.9}, {"max_error": 0.3}, {"rank_max": 3},
                                    {"energy": 0.999, "rank_max": 4}])
def test_every_method_honours_the_rank_policy_and_measures_its_error(sources, policy):
    for name, used in methods_and_sources(sources):
        weights = WEIGHTS[:len(used)]
        stats = random_statistics(used) if get_method(name).needs_statistics else None
        merged = loramerge.merge(used, method=name, weights=weights, compute_dtype="fp64", seed=5, statistics=stats,
                                 **policy)
        for row in merged.report.modules:
            own = run_method(name, module_inputs(used, row.module, weights, seed=5, statistics=stats))
            achieved = relative_error(merged.delta(row.module, torch.float64), own)
            assert achieved == pytest.approx(row.relative_error, abs=1e-6), (name, row.module)
            assert row.energy_kept == pytest.approx(1 - achieved**2, abs=1e-6), (name, row.module)
            cap = policy.get("rank", policy.get("rank_max"))
            if cap is not None:
                assert row.output_rank <= cap, (name, row.module)
            if "energy" in policy and row.output_rank != policy.get("rank_max"):
                assert row.energy_kept >= policy["energy"] - 1e-9, (name, row.module)
            if "max_error" in policy:
                assert row.relative_error <= policy["max_error"] + 1e-9, (name, row.module)


def test_dense_methods_default_to_the_largest_source_rank(sources):
    for name in ("ties", "dare_ties", "magnitude_prune", "breadcrumbs", "della", "dare_linear"):
        merged = loramerge.merge(sources, method=name)
        assert {lr.rank for lr in merged.layers.values()} == {6}, name


def test_per_module_ranks_reach_peft_through_rank_pattern(llama, llama_adapters, tmp_path):
    names = ["plain", "rslora", "patterns"]
    merged = loramerge.merge([llama_adapters[n] for n in names], method="ties", density=0.5, energy=0.8)
    assert len({lr.rank for lr in merged.layers.values()}) > 1
    out = merged.save(tmp_path / "ties")
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(copy.deepcopy(llama), str(out))
    assert not [w for w in caught if "peft" in w.filename and "Could not find a config" not in str(w.message)]
    oracle = peft_deltas(llama, out)
    for module, lowrank in merged.layers.items():
        assert relative_error(oracle[module], lowrank.base_delta(torch.float64)) < 1e-5, module


def sparsified_sum(m: int, n: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) for _ in range(3)]
    return sum(magnitude(p, 0.2) for p in parts)


def optimal_error(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return math.sqrt(float(s[k:].square().sum() / s.square().sum()))


@pytest.mark.parametrize("k", [4, 16])
def test_randomized_rank_k_is_within_one_percent_of_optimal(k):
    delta = sparsified_sum(300, 700)
    t = truncate_dense(delta, RankPolicy(rank=k))
    assert t.A.shape[0] == k
    measured = math.sqrt(float((delta - t.B @ t.A).double().square().sum() / delta.double().square().sum()))
    assert t.relative_error == pytest.approx(measured, rel=1e-4)
    assert measured <= 1.01 * optimal_error(delta, k)


@pytest.mark.parametrize("target", [0.6, 0.3])
def test_error_target_is_met_with_close_to_the_optimal_rank(target):
    delta = sparsified_sum(700, 900, seed=1)
    t = truncate_dense(delta, RankPolicy(max_error=target))
    k = t.A.shape[0]
    assert t.relative_error <= target
    s2 = torch.linalg.svdvals(delta.double()).square()
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]) / s2.sum()  # tail[i] = energy beyond i-1
    best = int((tail.sqrt() > target).sum())  # the smallest rank meeting the target
    assert best <= k <= best + max(3, best // 50)


def test_gram_spectrum_matches_the_svd_for_large_matrices():
    delta = torch.randn(1100, 1300, generator=torch.Generator().manual_seed(0))
    U, S = full_left_spectrum(delta)
    exact = torch.linalg.svdvals(delta)
    assert torch.allclose(S[:1000], exact[:1000], rtol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(1100), atol=1e-4)


def test_a_zero_module_stays_a_zero_update():
    zero = loramerge.Adapter({"m": loramerge.LowRank(torch.zeros(2, 5), torch.zeros(4, 2))})
    for name in ("ties", "knots", "iso_c", "tsv"):
        merged = loramerge.merge([zero, zero], method=name)
        assert float(merged.delta("m").abs().max()) == 0.0, name


def test_a_rank_above_the_numerical_rank_keeps_factors_storable_in_fp16(tmp_path):
    sources = [random_adapter(i, rank=2, shapes={"m": (30, 20)}) for i in range(2)]
    merged = loramerge.merge(sources, method="dare_linear", density=1.0, rank=20)  # dense, numerical rank 4
    assert merged["m"].rank == 4
    reloaded = loramerge.load(merged.save(tmp_path / "fp16", dtype="fp16"))
    assert torch.isfinite(reloaded["m"].A).all() and torch.isfinite(reloaded["m"].B).all()
    exact = sum(s.delta("m", torch.float64) for s in sources)
    assert relative_error(reloaded.delta("m"), exact) < 1e-3
