"""The factored SVD against dense float64 SVDs, and the rank policies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramerge.core.linalg import dense_svd, factored_svd
from loramerge.core.rank import RankPolicy, spectrum_stats
from loramerge.errors import InvalidParameter


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40), n=st.integers(1, 40), R=st.integers(1, 24), seed=st.integers(0, 10_000),
)
def test_factored_svd_equals_dense_svd(m, n, R, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(m, R, generator=g, dtype=torch.float64), torch.randn(R, n, generator=g, dtype=torch.float64)
    svd = factored_svd(B, A)
    dense = B @ A
    expected = torch.linalg.svdvals(dense)
    k = min(m, n, R)
    torch.testing.assert_close(svd.S[:k], expected[:k], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close((svd.U * svd.S) @ svd.V.T, dense, atol=1e-9, rtol=1e-9)
    # Orthonormal singular vectors on the non-zero part of the spectrum.
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(svd.U.shape[1], dtype=torch.float64), atol=1e-9, rtol=0)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_truncation_is_eckart_young(k, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(30, 12, generator=g, dtype=torch.float64), torch.randn(12, 25, generator=g, dtype=torch.float64)
    Bk, Ak = factored_svd(B, A).factors(k)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    torch.testing.assert_close(Bk @ Ak, (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-8, rtol=1e-8)


def test_float32_factored_svd_accuracy_on_large_matrix():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(1024, 48, generator=g) / 30, torch.randn(48, 768, generator=g) / 30
    svd = factored_svd(B, A)
    dense = (B.double() @ A.double())
    err = ((svd.U.double() * svd.S.double()) @ svd.V.double().T - dense).norm() / dense.norm()
    assert err < 1e-5


def test_randomized_dense_svd_is_accurate_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(200, 10, generator=g) @ torch.randn(10, 150, generator=g)
    noisy = low + 1e-3 * torch.randn(200, 150, generator=g)
    svd = dense_svd(noisy, max_rank=10)
    exact = torch.linalg.svdvals(noisy)[:10]
    torch.testing.assert_close(svd.S[:10], exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RankPolicy(rank=2), 2),
        (RankPolicy(rank=9), 4),
        (RankPolicy(energy=0.5), 1),
        (RankPolicy(energy=1.0), 4),
        (RankPolicy(max_error=0.5), 1),
        (RankPolicy(max_error=0.0), 4),
        (RankPolicy(energy=0.999, rank_max=2), 2),
        (RankPolicy(), 4),
    ],
)
def test_rank_policy_choices(policy, expected):
    assert policy.choose(torch.tensor([4.0, 2.0, 1.0, 0.5])) == expected


def test_rank_policy_error_guarantee():
    S = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])
    for target in (0.05, 0.2, 0.4):
        k = RankPolicy(max_error=target).choose(S)
        _, err = spectrum_stats(S, k)
        assert err <= target
        _, err_smaller = spectrum_stats(S, k - 1) if k > 1 else (0, 1.0)
        assert err_smaller > target


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(energy=1.5), dict(max_error=-1), dict(rank=2, energy=0.9)])
def test_rank_policy_validation(kwargs):
    with pytest.raises(InvalidParameter):
        RankPolicy(**kwargs)


def test_rank_deficient_and_ill_conditioned_factors_take_the_exact_route():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    doubled = factored_svd(torch.cat([B, B], 1), torch.cat([A, A], 0))  # duplicate columns: rank-deficient
    Bk, Ak = doubled.factors(5)
    torch.testing.assert_close(Bk @ Ak, 2 * B @ A, atol=1e-10, rtol=1e-10)
    skewed = B * torch.tensor([1.0, 1e-7, 1.0, 1e-9, 1.0], dtype=torch.float64)
    Bk, Ak = factored_svd(skewed, A).factors(5)
    torch.testing.assert_close(Bk @ Ak, skewed @ A, atol=1e-10, rtol=1e-10)
