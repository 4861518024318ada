"""The report's epsilons, recomputed from the sites' ledger files with dp-accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmm.client.privacy_ledger import PrivacyLedger, calibrate_noise_multiplier, epsilon_of
from fedmm.simulations.privacy.epsilon_cross_check import cross_check_history, cross_check_ledgers

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def _ledger(path: Path, history: list[tuple[float, float, int]], delta: float | None) -> None:
    PrivacyLedger(noise_multiplier=None, delta=delta, history=history, rounds=[1]).save(path)


def test_ledgers_of_a_run_are_cross_checked(tmp_path: Path) -> None:
    sigma = calibrate_noise_multiplier(epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=20)
    history = [(20.0, 1.0, 1), *[(sigma, 0.25, 4)] * 5]  # a noisy count, five rounds of 4 steps
    _ledger(tmp_path / "site-0.json", history, 1e-5)
    _ledger(tmp_path / "site-10.json", history[:2], 1e-5)
    _ledger(tmp_path / "site-2.json", [], None)  # DP off: nothing spent, skipped
    results = cross_check_ledgers(tmp_path)
    assert [r.site for r in results] == ["0", "10"]
    full = results[0]
    assert full.opacus_rdp == pytest.approx(epsilon_of(history, 1e-5))
    assert epsilon_of(history[1:], 1e-5) < full.opacus_rdp < 3.1  # the count adds a little
    assert full.dp_accounting_rdp_same_orders == pytest.approx(full.opacus_rdp, rel=0.01)
    assert full.dp_accounting_rdp <= full.opacus_rdp * 1.01
    assert full.dp_accounting_pld < full.dp_accounting_rdp  # PLD is the tighter bound
    assert full.steps == 20 and full.sample_rate == 0.25 and full.delta == 1e-5
    assert full.noise_multiplier == sigma  # DP-SGD's, not the count's
    assert results[1].opacus_rdp < full.opacus_rdp  # epsilon is cumulative


def test_a_ledger_without_delta_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "site-0.json").write_text(
        json.dumps({"history": [[1.0, 0.1, 10]], "delta": None, "rounds": [1]})
    )
    with pytest.raises(ValueError, match="no valid delta"):
        cross_check_ledgers(tmp_path)


def test_an_empty_history_has_no_epsilon_to_check() -> None:
    with pytest.raises(ValueError, match="never trained with DP"):
        cross_check_history("3", [], 1e-5)
