"""The PLD accountant of a site's history: valid (never below the exact epsilon of the
Gaussian mechanism alone), tighter than RDP, and its calibration meets the target."""

from __future__ import annotations

import dp_accounting
import pytest

from fedmm.client.pld_accounting import calibrate_noise_multiplier_pld, pld_epsilon_of
from fedmm.client.privacy_ledger import count_charge, epsilon_of

DELTA = 1e-5


def test_gaussian_mechanism_alone_matches_its_exact_epsilon() -> None:
    # the noisy count (q = 1): PLD of the Gaussian mechanism is exact up to discretisation
    sigma = dp_accounting.get_sigma_gaussian(1.0, DELTA)
    assert pld_epsilon_of([count_charge(sigma)], DELTA) == pytest.approx(1.0, rel=0.01)


def test_pld_is_below_rdp_for_the_default_run() -> None:
    history = [count_charge(20.0), (1.4248, 1 / 24, 336)]
    rdp, pld = epsilon_of(history, DELTA), pld_epsilon_of(history, DELTA)
    assert rdp == pytest.approx(2.997, abs=0.01)
    assert 2.6 < pld < rdp


def test_calibration_meets_the_target_and_uses_less_noise() -> None:
    spent = [count_charge(20.0)]
    sigma = calibrate_noise_multiplier_pld(
        epsilon=3.0, delta=DELTA, sample_rate=1 / 24, steps=336, spent=spent
    )
    assert 2.97 < pld_epsilon_of([*spent, (sigma, 1 / 24, 336)], DELTA) <= 3.0
    assert pld_epsilon_of([*spent, (sigma * 0.97, 1 / 24, 336)], DELTA) > 3.0
    assert sigma < 1.4248  # the RDP-calibrated sigma of the same run


def test_bad_entry_is_named() -> None:
    with pytest.raises(ValueError, match="bad ledger entry"):
        pld_epsilon_of([(0.0, 0.1, 10)], DELTA)
