"""SVD-space methods (KnOTS, TSV, Iso-C/CTS, Core Space, SLERP): dense float64 references and identities."""

from __future__ import annotations

import pytest
import torch

import loramerge
from loramerge import Adapter, InvalidParameter, LowRank
from tests.method_fixtures import (
    core_space_reference,
    iso_c_reference,
    iso_cts_reference,
    knots_reference,
    module_inputs,
    random_adapter,
    relative_error,
    run_method,
    slerp_reference,
    tsv_reference,
    weighted_deltas,
)

WEIGHTS = [0.7, -0.4, 1.3]
MODULES = ["layer.q", "layer.up", "layer.down"]


@pytest.fixture(scope="module")
def sources():
    return [random_adapter(1, rank=4, scale=0.5), random_adapter(2, rank=6, scale=2.0), random_adapter(3, rank=3)]


@pytest.mark.parametrize("module", MODULES)
def test_iso_c_matches_the_paper_on_the_nonzero_spectrum(sources, module):
    got = run_method("iso_c", module_inputs(sources, module, WEIGHTS))
    assert relative_error(got, iso_c_reference(weighted_deltas(sources, module, WEIGHTS))) < 1e-10


@pytest.mark.parametrize("module", MODULES)
def test_tsv_matches_the_paper(sources, module):
    got = run_method("tsv", module_inputs(sources, module, WEIGHTS), lambda_=0.8)
    assert relative_error(got, 0.8 * tsv_reference(weighted_deltas(sources, module, WEIGHTS))) < 1e-10


@pytest.mark.parametrize("fraction", [0.8, 0.5])
@pytest.mark.parametrize("module", MODULES)
def test_iso_cts_matches_the_paper_on_the_nonzero_spectrum(sources, module, fraction):
    got = run_method("iso_cts", module_inputs(sources, module, WEIGHTS), common_fraction=fraction)
    expected = iso_cts_reference(weighted_deltas(sources, module, WEIGHTS), fraction)
    assert relative_error(got, expected) < 1e-9


@pytest.mark.parametrize("module", MODULES)
def test_knots_ties_matches_the_dense_reference(sources, module):
    got = run_method("knots", module_inputs(sources, module, WEIGHTS), density=0.3)
    assert relative_error(got, knots_reference(weighted_deltas(sources, module, WEIGHTS), 0.3)) < 1e-9


@pytest.mark.parametrize("module", MODULES)
def test_core_space_ties_matches_the_dense_reference(sources, module):
    factors = []
    for adapter, w in zip(sources, WEIGHTS):
        B, A = adapter.layers[module].matrices(torch.float64)
        factors.append((B, A, w * adapter.layers[module].scale))
    got = run_method("core_space", module_inputs(sources, module, WEIGHTS), inner="ties", density=0.3)
    assert relative_error(got, core_space_reference(factors, 0.3)) < 1e-9


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_aligned_task_arithmetic_is_exactly_linear(sources, method):
    merged = loramerge.merge(sources, method=method, inner="task_arithmetic", weights=WEIGHTS)
    linear = loramerge.merge(sources, method="linear", weights=WEIGHTS)
    for module in MODULES:
        assert relative_error(merged.delta(module), linear.delta(module, torch.float64)) < 1e-5
        assert merged.report.modules[0].relative_error == 0.0  # stored exactly, no truncation


@pytest.mark.parametrize("inner", ["tsv", "iso_c", "iso_cts"])
def test_core_space_with_a_spectral_inner_equals_the_full_space_method(sources, inner):
    for module in MODULES:
        inputs = module_inputs(sources, module, WEIGHTS)
        assert relative_error(run_method("core_space", inputs, inner=inner), run_method(inner, inputs)) < 1e-9


def test_iso_c_rank_never_exceeds_the_rank_of_the_sum():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 40, generator=g), torch.randn(30, 3, generator=g)
    # The same update three times at different scales: the sum has rank 3, not 9 and not 30.
    sources = [Adapter({"m": LowRank(A, B, scale=s)}) for s in (1.0, 0.5, 2.0)]
    for method in ("iso_c", "iso_cts", "tsv"):
        merged = loramerge.merge(sources, method=method)
        delta = merged.delta("m", torch.float64)
        assert int(torch.linalg.matrix_rank(delta)) <= 3, method
        # Every output direction lies in the sum's column space: nothing was invented.
        Q, _ = torch.linalg.qr(B.double())
        assert relative_error(Q @ (Q.T @ delta), delta) < 1e-6, method


@pytest.mark.parametrize("module", MODULES)
def test_iso_c_rank_is_at_most_the_rank_of_the_sum_on_random_sources(sources, module):
    inputs = module_inputs(sources, module, WEIGHTS)
    iso = run_method("iso_c", inputs)
    total = sum(weighted_deltas(sources, module, WEIGHTS))
    assert torch.linalg.matrix_rank(iso) <= torch.linalg.matrix_rank(total)


def test_slerp_matches_the_formula_and_needs_two_sources(sources):
    for t in (0.0, 0.3, 1.0):
        got = run_method("slerp", module_inputs(sources[:2], "layer.q", [0.7, -0.4]), t=t)
        u0, u1 = weighted_deltas(sources[:2], "layer.q", [0.7, -0.4])
        assert relative_error(got, slerp_reference(u0, u1, t)) < 1e-10
    with pytest.raises(InvalidParameter, match="exactly 2 sources"):
        loramerge.merge(sources, method="slerp")


def test_slerp_of_parallel_updates_is_linear_interpolation():
    lr = LowRank(torch.ones(2, 5), torch.ones(4, 2))
    merged = loramerge.merge([Adapter({"m": lr}), Adapter({"m": lr})], method="slerp", weights=[1.0, 3.0], t=0.25)
    assert torch.allclose(merged.delta("m"), (0.75 * 1.0 + 0.25 * 3.0) * lr.product(), atol=1e-5)


@pytest.mark.parametrize("method", ["knots", "tsv", "iso_c", "iso_cts", "core_space", "slerp"])
def test_a_module_missing_from_a_source_contributes_nothing(method):
    a, b = random_adapter(1), random_adapter(2)
    b_missing = Adapter({k: v for k, v in b.layers.items() if k != "layer.q"})
    with_zero = loramerge.merge([a, b], method=method, weights=[1.0, 0.0])
    missing = loramerge.merge([a, b_missing], method=method)
    assert torch.allclose(with_zero.delta("layer.q"), missing.delta("layer.q"), atol=1e-6)


def test_subspace_methods_stay_exact_and_low_rank(sources):
    total_rank = 4 + 6 + 3
    for method in ("knots", "tsv", "iso_c", "iso_cts", "core_space"):
        merged = loramerge.merge(sources, method=method, weights=WEIGHTS)
        for m in merged.report.modules:
            assert m.output_rank <= total_rank
            assert m.relative_error == 0.0 and m.energy_kept == 1.0
