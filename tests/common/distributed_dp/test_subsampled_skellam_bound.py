"""The Poisson-subsampling bound of ``common.distributed_dp.accounting`` in both directions.

The accountant uses the binomial expansion for the "remove" direction and an argument that
the "add" direction is never larger when the pair of output laws is symmetric (an integer
shift of a law symmetric about its centre, as Skellam noise is). These tests check the three
steps of that argument and the result against the exact RDP of a subsampled Skellam pair.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from fedmm.common.distributed_dp.accounting import poisson_subsampled_rdp, skellam_rdp

ORDERS = (2, 3, 4, 7, 16, 64, 256)
RATES = (1e-3, 0.05, 0.3, 0.9, 1.0)


def _renyi(order: float, p: np.ndarray, q: np.ndarray) -> float:
    """D_order(p || q) of two probability vectors on the same support, in log space."""
    log_terms = order * np.log(p) + (1 - order) * np.log(q)
    top = log_terms.max()
    return float((top + np.log(np.exp(log_terms - top).sum())) / (order - 1))


def _directions(order: int, rate: float, p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """("remove", "add") = (D(M || P), D(P || M)) with M = (1 - rate) P + rate Q."""
    mixture = (1 - rate) * p + rate * q
    return _renyi(order, mixture, p), _renyi(order, p, mixture)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("rate", RATES)
def test_orbit_inequality_holds(order: int, rate: float) -> None:
    """X^a + t Y^a >= X^(1-a) + t Y^(1-a) for X = 1 - q + q t, Y = 1 - q + q / t, t >= 1."""
    t = np.exp(np.linspace(0.0, 40.0, 4001))
    with np.errstate(divide="ignore"):  # log(1 - rate) is -inf at rate 1
        log_keep, log_rate = np.log(1 - rate), np.log(rate)
    log_x = np.logaddexp(log_keep, log_rate + np.log(t))
    log_y = np.logaddexp(log_keep, log_rate - np.log(t))
    remove = np.logaddexp(order * log_x, np.log(t) + order * log_y)
    add = np.logaddexp((1 - order) * log_x, np.log(t) + (1 - order) * log_y)
    assert np.all(remove >= add - 1e-12)


def _symmetric_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = int(rng.integers(2, 9))
    p = rng.dirichlet(np.full(size, rng.choice([0.3, 1.0, 4.0])))
    p = np.maximum(p, 1e-9)
    p /= p.sum()
    q = p[::-1].copy()  # T(i) = size - 1 - i swaps the two laws
    if rng.random() < 0.3:  # a product of two symmetric pairs is symmetric (2-D shift)
        other = rng.dirichlet(np.ones(int(rng.integers(2, 5))))
        other = np.maximum(other, 1e-9) / np.maximum(other, 1e-9).sum()
        p, q = np.outer(p, other).ravel(), np.outer(q, other[::-1]).ravel()
    return p, q


def test_add_never_exceeds_remove_for_symmetric_pairs() -> None:
    rng = np.random.default_rng(20261204)
    for _ in range(3000):
        p, q = _symmetric_pair(rng)
        rate = float(rng.choice([0.01, 0.05, 0.3, 0.7, rng.random()]))
        order = int(rng.integers(2, 20))
        remove, add = _directions(order, rate, p, q)
        assert add <= remove * (1 + 1e-9) + 1e-13, (order, rate, p, q)


def test_without_the_symmetry_add_can_exceed_remove() -> None:
    """The argument needs the symmetric pair: for arbitrary pairs "add" can be the larger."""
    rng = np.random.default_rng(7)
    exceeded = 0
    for _ in range(500):
        p, q = (rng.dirichlet(np.ones(4)) for _ in range(2))
        remove, add = _directions(int(rng.integers(2, 10)), 0.3, p, q)
        exceeded += add > remove * (1 + 1e-6)
    assert exceeded > 50


def _skellam_pair(variance: float, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Sk(variance) and its shift by ``shift``; P(k) = e^-mu I_|k|(mu) (Skellam, mu/2 each)."""
    support = np.arange(-150, 151 + shift)
    p = special.ive(np.abs(support), variance)
    q = special.ive(np.abs(support - shift), variance)
    kept = (p > 1e-280) & (q > 1e-280)  # the tails beyond carry less than 1e-250 of the mass
    return p[kept] / p[kept].sum(), q[kept] / q[kept].sum()


@pytest.mark.parametrize(("variance", "shift"), [(3.0, 1), (10.0, 2), (40.0, 3)])
@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_bound_covers_the_exact_subsampled_skellam_rdp(
    variance: float, shift: int, rate: float
) -> None:
    p, q = _skellam_pair(variance, shift)
    for order in (2, 3, 5, 8, 16):
        exact = max(_directions(order, rate, p, q))
        bound = poisson_subsampled_rdp(
            order,
            sample_rate=rate,
            rdp=lambda k: skellam_rdp(k, variance=variance, l1=shift, l2=shift),
        )
        assert exact <= bound
        # With the exact unsampled RDP in place of Agarwal et al.'s bound, the expansion is the
        # exact "remove" divergence: the accountant's arithmetic, not just an upper bound.
        expansion = poisson_subsampled_rdp(order, sample_rate=rate, rdp=lambda k: _renyi(k, q, p))
        assert expansion == pytest.approx(_directions(order, rate, p, q)[0], rel=1e-6)


def test_bound_is_close_to_exact_when_the_noise_is_wide() -> None:
    """Agarwal et al.'s surcharge fades as the variance grows: the bound is then nearly exact."""
    p, q = _skellam_pair(40.0, 3)
    for order in (2, 5, 8):
        exact = max(_directions(order, 0.05, p, q))
        bound = poisson_subsampled_rdp(
            order, sample_rate=0.05, rdp=lambda k: skellam_rdp(k, variance=40.0, l1=3, l2=3)
        )
        assert exact <= bound <= 1.1 * exact


def test_rate_one_is_the_unsampled_rdp_and_small_rates_shrink_it() -> None:
    def rdp(k: int) -> float:
        return skellam_rdp(k, variance=400.0, l1=2.0, l2=2.0)

    assert poisson_subsampled_rdp(8, sample_rate=1.0, rdp=rdp) == rdp(8)
    small = poisson_subsampled_rdp(8, sample_rate=0.01, rdp=rdp)
    assert 0 < small < rdp(8) / 100
    assert math.isfinite(poisson_subsampled_rdp(256, sample_rate=0.05, rdp=rdp))
