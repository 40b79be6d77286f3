"""Per-entry methods (TIES, magnitude prune, DARE, Breadcrumbs, DELLA): paper references, identities, statistics."""

from __future__ import annotations

import math

import pytest
import torch

import loramerge
from loramerge import Adapter, LowRank
from loramerge.merge.methods.sparsify import kth_largest, kth_largest_magnitude
from tests.method_fixtures import (
    breadcrumbs_reference,
    della_probabilities,
    elect_and_mean_reference,
    module_inputs,
    random_adapter,
    relative_error,
    run_method,
    ties_reference,
    trim_reference,
    weighted_deltas,
)

WEIGHTS = [0.7, -0.4, 1.3]
MODULE = "layer.up"


@pytest.fixture(scope="module")
def sources():
    return [random_adapter(1, rank=4, scale=0.5), random_adapter(2, rank=6, scale=2.0), random_adapter(3, rank=3)]


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.55])
def test_ties_matches_the_paper(sources, density, majority_sign):
    got = run_method("ties", module_inputs(sources, MODULE, WEIGHTS), density=density, majority_sign=majority_sign)
    expected = ties_reference(weighted_deltas(sources, MODULE, WEIGHTS), density, majority_sign)
    assert relative_error(got, expected) < 1e-12


def test_ties_lambda_scales_the_result(sources):
    inputs = module_inputs(sources, MODULE, WEIGHTS)
    assert torch.allclose(run_method("ties", inputs, lambda_=0.3), 0.3 * run_method("ties", inputs), atol=1e-12)


def test_magnitude_prune_matches_the_paper(sources):
    got = run_method("magnitude_prune", module_inputs(sources, MODULE, WEIGHTS), density=0.3)
    expected = sum(trim_reference(d, 0.3) for d in weighted_deltas(sources, MODULE, WEIGHTS))
    assert relative_error(got, expected) < 1e-12


def test_breadcrumbs_matches_the_reference_mask(sources):
    got = run_method("breadcrumbs", module_inputs(sources, MODULE, WEIGHTS), density=0.3, gamma=0.1, lambda_=0.5)
    expected = 0.5 * sum(breadcrumbs_reference(d, 0.3, 0.1) for d in weighted_deltas(sources, MODULE, WEIGHTS))
    assert relative_error(got, expected) < 1e-12


def test_per_source_density_is_applied_to_each_source(sources):
    got = run_method("magnitude_prune", module_inputs(sources, MODULE, WEIGHTS), density=[0.1, 0.5, 0.9])
    deltas = weighted_deltas(sources, MODULE, WEIGHTS)
    expected = sum(trim_reference(d, density) for d, density in zip(deltas, [0.1, 0.5, 0.9]))
    assert relative_error(got, expected) < 1e-12


def single_source_sparsified(method: str, sources, index: int, **params) -> torch.Tensor:
    """What the sparsifier did to source ``index``: the same merge with every other weight set to 0."""
    weights = [w if i == index else 0.0 for i, w in enumerate(WEIGHTS)]
    return run_method(method, module_inputs(sources, MODULE, weights), **params)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_elect_and_average_their_sparsified_updates(sources, method):
    """Each source's mask depends only on the seed, the module and its own index, so the sources
    sparsified alone are exactly what the full merge elects and averages."""
    alone = [single_source_sparsified(method, sources, i, density=0.6) for i in range(3)]
    got = run_method(method, module_inputs(sources, MODULE, WEIGHTS), density=0.6)
    assert relative_error(got, elect_and_mean_reference(alone)) < 1e-12


def test_dare_rescales_survivors_by_one_over_density(sources):
    delta = weighted_deltas(sources, MODULE, WEIGHTS)[0]
    dropped = single_source_sparsified("dare_linear", sources, 0, density=0.4)
    kept = dropped != 0
    assert torch.allclose(dropped[kept], delta[kept] / 0.4, rtol=1e-12)


def test_della_rescales_survivors_by_their_keep_probability(sources):
    delta = weighted_deltas(sources, MODULE, WEIGHTS)[1]
    dropped = single_source_sparsified("della", sources, 1, density=0.5, epsilon=0.3)
    kept = dropped != 0
    p = della_probabilities(delta, 0.5, 0.3)
    assert torch.allclose(dropped[kept], delta[kept] / p[kept], rtol=1e-12)


def test_dare_keeps_the_density_fraction_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    lr = LowRank(torch.randn(8, 150, generator=g, dtype=torch.float64), torch.randn(100, 8, generator=g, dtype=torch.float64))
    adapters = [Adapter({"m": lr})]
    exact = lr.product(torch.float64)
    density, seeds = 0.3, 200
    total = torch.zeros_like(exact)
    for seed in range(seeds):
        out = run_method("dare_linear", module_inputs(adapters, "m", [1.0], seed=seed), density=density)
        n = out.numel()
        # Kept fraction within 5 binomial standard deviations of the density.
        assert abs(float((out != 0).sum()) / n - density) < 5 * math.sqrt(density * (1 - density) / n)
        total += out
    mean = total / seeds
    # The mean over seeds converges to the plain update: each entry's standard error is
    # |x|·sqrt((1-d)/(d·seeds)); the relative Frobenius error is about that factor.
    assert relative_error(mean, exact) < 3 * math.sqrt((1 - density) / (density * seeds))


def test_della_keeps_small_entries_less_often():
    # Every row of the update is 1, 2, …, 200: the magnitude rank of entry j is j.
    row = torch.arange(1.0, 201.0, dtype=torch.float64)[None, :]
    adapters = [Adapter({"m": LowRank(row, torch.ones(50, 1, dtype=torch.float64))})]
    counts = torch.zeros(200, dtype=torch.float64)
    for seed in range(40):
        out = run_method("della", module_inputs(adapters, "m", [1.0], seed=seed), density=0.5, epsilon=0.4)
        counts += (out != 0).sum(0)
    frequency = counts / (40 * 50)
    expected = 0.1 + 0.8 * torch.arange(200, dtype=torch.float64) / 199
    assert float((frequency - expected).abs().max()) < 0.1
    assert abs(float(frequency.mean()) - 0.5) < 0.02


# ---- identities ----------------------------------------------------------------------------------

def disjoint_sources() -> list[Adapter]:
    """Three adapters whose updates live on disjoint output rows: no entry is shared."""
    out = []
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        B = torch.zeros(30, 3)
        B[10 * i:10 * (i + 1)] = torch.randn(10, 3, generator=g)
        out.append(Adapter({"m": LowRank(torch.randn(3, 20, generator=g), B, scale=0.7)}))
    return out


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "della", "magnitude_prune"])
def test_density_one_without_conflicts_equals_linear(method):
    sources = disjoint_sources()
    weights = [0.5, -1.5, 2.0]
    params = {"density": 1.0} | ({"epsilon": 0.0} if method == "della" else {})
    merged = loramerge.merge(sources, method=method, weights=weights, rank=20, **params)
    linear = loramerge.merge(sources, method="linear", weights=weights)
    assert relative_error(merged.delta("m"), linear.delta("m", torch.float64)) < 1e-5


def test_ties_of_agreeing_sources_is_their_mean():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 20, generator=g), torch.randn(30, 3, generator=g)
    sources = [Adapter({"m": LowRank(A, B * c)}) for c in (0.5, 1.0, 2.5)]  # same signs everywhere
    ties = loramerge.merge(sources, method="ties", density=1.0)
    mean = loramerge.merge(sources, method="linear", weights=[1 / 3] * 3)
    assert relative_error(ties.delta("m"), mean.delta("m", torch.float64)) < 1e-5
    assert ties.report.modules[0].extra["sign_conflicts"] == 0.0


def test_dare_at_density_one_is_linear_for_any_inputs(sources):
    got = run_method("dare_linear", module_inputs(sources, MODULE, WEIGHTS), density=1.0)
    assert relative_error(got, sum(weighted_deltas(sources, MODULE, WEIGHTS))) < 1e-12
    assert torch.equal(run_method("dare_ties", module_inputs(sources, MODULE, WEIGHTS), density=1.0),
                       run_method("ties", module_inputs(sources, MODULE, WEIGHTS), density=1.0))


# ---- determinism ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dare_ties", "della", "dare_linear"])
def test_same_seed_gives_identical_bytes(tmp_path, sources, method):
    paths = []
    for name in ("a", "b"):
        merged = loramerge.merge(sources, method=method, weights=WEIGHTS, seed=7)
        paths.append(merged.save(tmp_path / name) / "adapter_model.safetensors")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = loramerge.merge(sources, method=method, weights=WEIGHTS, seed=8)
    first = loramerge.merge(sources, method=method, weights=WEIGHTS, seed=7)
    assert not torch.equal(other.delta(MODULE), first.delta(MODULE))


def test_masks_do_not_depend_on_module_order(sources):
    reordered = [Adapter(dict(reversed(list(a.layers.items())))) for a in sources]
    straight = loramerge.merge(sources, method="dare_ties", weights=WEIGHTS, seed=3)
    backwards = loramerge.merge(reordered, method="dare_ties", weights=WEIGHTS, seed=3)
    assert list(backwards.layers) != list(straight.layers)
    for module in straight.layers:
        assert torch.equal(straight.delta(module), backwards.delta(module))


# ---- the exact k-th largest used by the trim -----------------------------------------------------

@pytest.mark.parametrize("k", [1, 17, 1_000_000, 4_999_999, 5_000_000])
def test_kth_largest_is_exact_on_large_inputs(k):
    values = torch.randn(5_000_000, generator=torch.Generator().manual_seed(k))
    assert kth_largest(values, k) == torch.kthvalue(values, values.numel() - k + 1).values


def test_kth_largest_with_many_ties():
    values = torch.cat([torch.ones(3_000_000), torch.zeros(2_500_000)])
    assert kth_largest(values, 3_000_001).item() == 0.0
    assert kth_largest(values, 2_999_999).item() == 1.0


def test_kth_largest_brackets_low_rank_matrices_without_a_full_selection(monkeypatch):
    """Rows of 11008 entries line up with a stride of 172: the bracket must still hold (no full kthvalue)."""
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(512, 16, generator=g) @ torch.randn(16, 11008, generator=g)).abs()
    calls = []
    real = torch.kthvalue

    def spy(tensor, k, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, k, *args, **kwargs)

    monkeypatch.setattr(torch, "kthvalue", spy)
    k = int(0.2 * values.numel())
    assert kth_largest(values, k) == real(values.flatten(), values.numel() - k + 1).values
    assert calls and max(calls) < values.numel() // 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["gaussian", "low_rank", "ties", "tiny", "with_inf"])
def test_kth_largest_magnitude_is_exact(dtype, kind):
    g = torch.Generator().manual_seed(1)
    values = {
        "gaussian": lambda: torch.randn(300_000, generator=g),
        "low_rank": lambda: torch.randn(64, 16, generator=g) @ torch.randn(16, 5000, generator=g),
        "ties": lambda: torch.cat([torch.zeros(200_000), torch.ones(100_000)]),
        "tiny": lambda: torch.rand(200_000, generator=g) * 1e-30,
        "with_inf": lambda: torch.cat([torch.zeros(100_000), torch.full((5,), float("inf"))]),
    }[kind]().to(dtype).abs()
    n = values.numel()
    for k in (1, 2, n // 5, n // 2, n - 1, n):
        assert kth_largest_magnitude(values, k) == torch.kthvalue(values.flatten(), n - k + 1).values
