"""Distributed DP through Flower's simulation runtime: real Messages, ClientApps, DP steps.

One 3-site, 3-round run (``simulation_driver.py``, in a subprocess in its own process
group, so neither Ray nor anything else it starts can outlive the test), every site
assuming all 3 sites honest (``dp-min-honest-sites = 3``):

- round 1: every site healthy: one DP-SGD step is applied;
- round 2: one site raises in the masked-input stage: 2 < 3 survivors, so the round is
  discarded before unmasking (no unmask request goes out), the reason is in metrics.jsonl and
  round 3 starts from the model of round 2;
- round 3: every site healthy again.
"""

from __future__ import annotations

import json

import pytest

from fedmm.client.privacy_ledger import PrivacyLedger, count_charge
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.secure_round import MESSAGE_MASKED, MESSAGE_SETUP, MESSAGE_UNMASK
from tests.simulations.simulation_driver import run_driver

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

FAULTS = {"2:secagg_masked": [2]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("ddp-sim")
    spill = base / "spill"
    spill.mkdir()
    driver = run_driver("distributed", base / "run", sites=3, rounds=3, faults=FAULTS, spill=spill)
    rounds = driver.recording["rounds"]
    return {
        "rows": driver.metrics(),
        "recording": driver.recording,
        "digests": {number: rounds[number]["model_digest"] for number in rounds},
        "out": driver.out,
        "log": driver.log,
        "leftovers": driver.leftovers,
    }


def test_rounds_with_all_sites_apply_a_step(run: dict) -> None:
    rows = {row["round"]: row for row in run["rows"]}
    assert sorted(rows) == [1, 2, 3]
    for number in (1, 3):
        assert "aborted" not in rows[number]
        assert rows[number]["sites_trained"] == 3
    assert run["recording"]["integer_update"] is True
    assert run["recording"]["min_survivors"] == 3
    digests = run["digests"]
    assert digests[1] != digests[2]  # round 1's step changed the model


def test_dropout_below_the_honest_count_discards_the_round_before_unmasking(run: dict) -> None:
    rows = {row["round"]: row for row in run["rows"]}
    assert "discarded before unmasking" in rows[2]["aborted"]
    assert rows[2]["sites_failed"] == 1
    sent = [tuple(entry) for entry in run["recording"]["sent"]]
    assert (2, MESSAGE_MASKED) in sent and (2, MESSAGE_UNMASK) not in sent
    assert (1, MESSAGE_UNMASK) in sent and (3, MESSAGE_UNMASK) in sent
    assert (3, MESSAGE_SETUP) in sent
    digests = run["digests"]
    assert digests[3] == digests[2]  # the discarded round left the model unchanged


def test_ledgers_name_the_distributed_rounds_and_stay_within_budget(run: dict) -> None:
    ledgers = sorted((run["out"] / "site-ledgers").glob("site-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger.load(path)
        # no site-local DP-SGD: only the run's noisy record count, charged once
        assert ledger.history == [count_charge(20.0)] and ledger.count_releases == 1
        assert sum(entry[4] for entry in ledger.distributed_history) == 3  # every step counts
        assert ledger.distributed_honest_sites == 3
        assert 0 < ledger.epsilon(1e-5) <= 3.0 + 1e-9
        statement = json.loads(path.read_text())["statement"]
        for words in ("3 distributed-DP rounds", "record-level", "Skellam", "3 honest sites"):
            assert words in statement
    assert "distributed DP under SecAgg+" in (run["out"] / "report.md").read_text()


def test_no_process_outlives_the_run(run: dict) -> None:
    """The driver ends its Ray runtime itself: nothing it started is left running 30 s after
    it exits."""
    assert run["leftovers"] == []
