"""Skellam noise shares: exact inversion, and the sum of n shares is Sk(total variance).

The shares come from the production sampler driven by an AES-256-CTR keystream under a fixed
key (a CSPRNG with a fixed seed), so the statistics below are reproducible; the tolerances
are a few standard errors, and the checks reject a sum whose variance is off by 10%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedmm.common.distributed_dp.skellam import (
    aes_ctr_random_bytes,
    poisson_by_inversion,
    secure_uniforms,
    skellam_share,
)

SITES = 10
TOTAL_VARIANCE = 60.0
SAMPLES = 200_000


def _sum_of_shares(total_variance: float, sites: int, share_sites: int, key: bytes) -> np.ndarray:
    """The sum over ``sites`` shares, each sized for ``share_sites`` shares."""
    source = aes_ctr_random_bytes(key)
    return sum(skellam_share(total_variance / share_sites, SAMPLES, source) for _ in range(sites))


def _distribution_errors(samples: np.ndarray, variance: float) -> list[str]:
    """Why ``samples`` are not Sk(variance): variance, mean, tails, chi-square."""
    errors = []
    n = len(samples)
    # Sample variance: standard error sqrt((mu4 - sigma^4) / n); Skellam excess kurtosis 1/var.
    se_var = variance * math.sqrt((2 + 1 / variance) / n)
    if abs(samples.var() - variance) > 4 * se_var:
        errors.append(f"variance {samples.var():.3f} vs {variance:.3f} (se {se_var:.3f})")
    if abs(samples.mean()) > 4 * math.sqrt(variance / n):
        errors.append(f"mean {samples.mean():.4f}")
    half = variance / 2
    for k in (2, 3, 4):
        t = math.ceil(k * math.sqrt(variance))
        expected = 2 * stats.skellam.sf(t - 1, half, half)  # P(|X| >= t)
        observed = np.mean(np.abs(samples) >= t)
        se = math.sqrt(expected * (1 - expected) / n)
        if abs(observed - expected) > 5 * se + 1e-6:
            errors.append(f"P(|X| >= {t}) = {observed:.5f} vs {expected:.5f}")
    edges = np.arange(-int(5 * math.sqrt(variance)), int(5 * math.sqrt(variance)) + 1)
    counts = np.array([np.sum(samples == k) for k in edges] + [np.sum(np.abs(samples) > edges[-1])])
    probs = np.append(stats.skellam.pmf(edges, half, half), 0.0)
    probs[-1] = 1 - probs[:-1].sum()
    chi2 = float(np.sum((counts - n * probs) ** 2 / (n * probs)))
    p_value = float(stats.chi2.sf(chi2, len(counts) - 1))
    if p_value < 1e-3:
        errors.append(f"chi-square p = {p_value:.2e}")
    return errors


def test_sum_of_shares_is_skellam_of_the_total_variance() -> None:
    samples = _sum_of_shares(TOTAL_VARIANCE, SITES, SITES, key=b"k" * 32)
    assert _distribution_errors(samples, TOTAL_VARIANCE) == []


def test_the_check_rejects_a_sum_with_ten_percent_more_variance() -> None:
    # Shares sized for 9 sites but 10 of them summed: variance 10/9 of the target.
    samples = _sum_of_shares(TOTAL_VARIANCE, SITES, SITES - 1, key=b"k" * 32)
    errors = _distribution_errors(samples, TOTAL_VARIANCE)
    assert any(error.startswith("variance") for error in errors)


@pytest.mark.parametrize("mean", [0.4, 7.0, 37.5, 2.5e5, 3.0e7])
def test_poisson_is_the_exact_inverse_cdf(mean: float) -> None:
    key = b"p" * 32
    uniforms, _ = secure_uniforms(3000, aes_ctr_random_bytes(key))
    ours = poisson_by_inversion(mean, 3000, aes_ctr_random_bytes(key))
    assert np.array_equal(ours, stats.poisson.ppf(uniforms, mean).astype(np.int64))


def test_large_share_has_the_intended_variance() -> None:
    variance = 4.0e6
    samples = skellam_share(variance, SAMPLES, aes_ctr_random_bytes(b"v" * 32))
    se = variance * math.sqrt(2 / SAMPLES)
    assert abs(samples.var() - variance) < 4 * se
    assert abs(samples.mean()) < 4 * math.sqrt(variance / SAMPLES)


def test_uniforms_are_exact_complements_in_the_open_interval() -> None:
    lower, upper = secure_uniforms(100_000, aes_ctr_random_bytes(b"u" * 32))
    assert np.all(lower > 0) and np.all(lower < 1)
    assert np.array_equal(lower + upper, np.ones_like(lower))


def test_default_source_is_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    """No seed anyone could know: two default draws differ, and the bytes come from
    ``os.urandom`` (counted through the default argument's object)."""
    first = skellam_share(1e4, 1000)
    second = skellam_share(1e4, 1000)
    assert not np.array_equal(first, second)
    calls: list[int] = []

    def counting(count: int) -> bytes:
        calls.append(count)
        return bytes(count)

    skellam_share(1e4, 10, counting)
    assert calls == [80, 80]  # 8 bytes a uniform, one uniform a Poisson draw, two draws
