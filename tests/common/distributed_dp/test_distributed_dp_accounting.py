"""Epsilon of the distributed mode against central DP-SGD, by Google's dp-accounting.

Same sampling rate q, noise multiplier z = sqrt(variance) / D2 and number of steps. Without
sampling the Skellam mechanism's RDP (Agarwal et al. 2021) matches the Gaussian's within 1%.
With Poisson sampling this project accounts with Zhu and Wang's general bound (ICML 2019,
Thm 6), which is valid for any mechanism but loose: the measured gap is pinned here and in
docs/distributed-dp.md, and the 1% target is an expected failure (strict: it is reported,
not hidden, and the test fails if a change closes the gap without updating the docs).
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from client.privacy_ledger import PrivacyLedger, combined_epsilon, epsilon_of
from common.distributed_dp.accounting import (
    SkellamRound,
    calibrate_variance,
    skellam_epsilon,
    skellam_rdp,
)
from common.distributed_dp.plan import plan_distributed_dp

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
    ("q", "steps", "gap_low", "gap_high"),
    [(1 / 28, 392, 0.25, 0.35), (1 / 14, 196, 0.55, 0.75)],
)
def test_sampled_gap_to_central_dp_sgd_is_what_the_docs_say(
    q: float, steps: int, gap_low: float, gap_high: float
) -> None:
    """At the noise that gives epsilon 3 under our bound, central DP-SGD with the same q, z
    and steps has a smaller epsilon; the relative gap is the cost of the valid bound."""
    variance = calibrate_variance(
        epsilon=3.0, delta=DELTA, sample_rate=q, steps=steps, l1=L1, l2=L2
    )
    z = math.sqrt(variance) / L2
    ours, central = _distributed_epsilon(q, z, steps), _central_epsilon(q, z, steps)
    assert ours == pytest.approx(3.0, rel=1e-3)
    assert central <= ours  # a valid upper bound never beats the tight Gaussian one
    assert gap_low <= ours / central - 1 <= gap_high


@pytest.mark.xfail(strict=True, reason="Zhu-Wang's general subsampling bound is 13-70% loose")
def test_sampled_distributed_epsilon_matches_central_within_1_percent() -> None:
    q, z, steps = 1 / 28, 1.6, 392
    assert _distributed_epsilon(q, z, steps) == pytest.approx(
        _central_epsilon(q, z, steps), rel=0.01
    )


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
