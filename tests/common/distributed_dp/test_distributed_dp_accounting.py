"""Epsilon of the distributed mode against central DP-SGD, by Google's dp-accounting.

Same sampling rate q, noise multiplier z = sqrt(variance) / D2 and number of steps. Without
sampling the Skellam mechanism's RDP (Agarwal et al. 2021) matches the Gaussian's within 1%;
with Poisson sampling the accountant's bound for both directions of add/remove (proved in
``common.distributed_dp.accounting``, checked in test_subsampled_skellam_bound.py) keeps it
within 1% too, and never below the Gaussian's (the Skellam surcharge is never negative).
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedmm.client.privacy_ledger import PrivacyLedger, combined_epsilon, epsilon_of
from fedmm.common.distributed_dp.accounting import (
    RDP_ORDERS,
    SkellamRound,
    calibrate_variance,
    skellam_epsilon,
    skellam_rdp,
)
from fedmm.common.distributed_dp.plan import plan_distributed_dp

DELTA = 1e-5
DIMENSION = 49_024
L2 = 64 * math.sqrt(DIMENSION) + math.sqrt(DIMENSION)
L1 = L2 * math.sqrt(DIMENSION)


def _central_epsilon(q: float, z: float, steps: int) -> float:
    accountant = RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(DELTA)


def _distributed_epsilon(q: float, z: float, steps: int) -> float:
    return skellam_epsilon([SkellamRound((z * L2) ** 2, L1, L2, q, steps)], DELTA)


def test_skellam_rdp_approaches_the_gaussian_for_large_variance() -> None:
    variance = (1.5 * L2) ** 2
    gaussian = 8 * L2**2 / (2 * variance)
    assert skellam_rdp(8, variance=variance, l1=L1, l2=L2) == pytest.approx(gaussian, rel=1e-3)


@pytest.mark.parametrize(("z", "steps"), [(0.8, 1), (5.0, 50), (20.0, 400)])
def test_unsampled_distributed_epsilon_matches_central_within_1_percent(
    z: float, steps: int
) -> None:
    ours, central = _distributed_epsilon(1.0, z, steps), _central_epsilon(1.0, z, steps)
    assert ours == pytest.approx(central, rel=0.01)


@pytest.mark.parametrize(
    ("q", "z", "steps"),
    [(1 / 28, 1.6, 392), (0.05, 1.53, 280), (1 / 14, 1.8, 196), (0.01, 1.0, 2000)],
)
def test_sampled_distributed_epsilon_matches_central_within_1_percent(
    q: float, z: float, steps: int
) -> None:
    ours, central = _distributed_epsilon(q, z, steps), _central_epsilon(q, z, steps)
    assert ours == pytest.approx(central, rel=0.01)
    assert central <= ours * (1 + 1e-6)  # Gaussian RDP is a lower bound of Skellam's


@pytest.mark.parametrize(("q", "z", "steps"), [(0.01, 0.9, 2000), (0.005, 0.8, 4000)])
def test_below_order_2_only_the_integer_orders_differ(q: float, z: float, steps: int) -> None:
    """With little noise the best Renyi order can be below 2, where only the Gaussian has
    fractional orders (1.3% and 2.2% more epsilon here); at the same integer orders the two
    agree to 0.1%: the subsampled Skellam bound itself adds nothing."""
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    ours = _distributed_epsilon(q, z, steps)
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-3)
    assert 1.0 < ours / _central_epsilon(q, z, steps) < 1.03


@pytest.mark.parametrize(("q", "steps"), [(1 / 28, 392), (0.05, 280)])
def test_noise_calibrated_to_epsilon_3_gives_central_dp_sgd_epsilon_3(q: float, steps: int) -> None:
    """At the noise this accountant calibrates for epsilon 3, central DP-SGD with the same q, z
    and steps is at epsilon 3 as well (within 1%): distributed DP costs no extra noise."""
    variance = calibrate_variance(
        epsilon=3.0, delta=DELTA, sample_rate=q, steps=steps, l1=L1, l2=L2
    )
    z = math.sqrt(variance) / L2
    assert _distributed_epsilon(q, z, steps) == pytest.approx(3.0, rel=1e-3)
    assert _central_epsilon(q, z, steps) == pytest.approx(3.0, rel=0.01)


def test_calibration_reaches_the_target_and_h_shares_carry_it() -> None:
    plan = plan_distributed_dp(
        epsilon=3.0,
        delta=DELTA,
        sample_rate=0.05,
        num_rounds=100,
        clip_norm=1.0,
        dimension=DIMENSION,
        min_honest_sites=7,
    )
    assert plan.run_epsilon(7) == pytest.approx(3.0, rel=1e-3)
    assert plan.run_epsilon(10) < 3.0 < plan.run_epsilon(6)  # more honest shares, more noise


def test_ledger_composes_both_kinds_and_merges_identical_rounds() -> None:
    gaussian = [(1.2, 0.05, 300)]
    ledger = PrivacyLedger(history=list(gaussian))
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon_of(gaussian, DELTA))
    # Integer orders only: within 1% of Opacus' fractional grid for a Gaussian-only history.
    assert combined_epsilon(gaussian, [], DELTA) == pytest.approx(
        epsilon_of(gaussian, DELTA), rel=0.01
    )
    entry = (float((2.0 * L2) ** 2), L1, L2, 0.05, 1)
    for _ in range(3):
        ledger.add_distributed_round(entry, honest_sites=10)
    assert ledger.distributed_history == [(*entry[:4], 3)]
    both = ledger.epsilon(DELTA)
    assert both > epsilon_of(gaussian, DELTA)
    assert both > skellam_epsilon([SkellamRound(*entry[:4], 3)], DELTA)
    restored = PrivacyLedger.from_record(ledger.to_record())
    assert restored.epsilon(DELTA) == pytest.approx(both)
