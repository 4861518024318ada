"""Distributed DP through Flower's simulation runtime: real Messages, ClientApps, DP steps.

One 3-site, 3-round run (``distributed_dp_simulation_driver.py``, in a subprocess in its own
process group, so neither Ray nor anything else it starts can outlive the test), every site
assuming all 3 sites honest (``dp-min-honest-sites = 3``):

- round 1: every site healthy: one DP-SGD step is applied;
- round 2: one site raises in the masked-input stage: 2 < 3 survivors, so the round is
  discarded before unmasking (no unmask request goes out), the reason is in metrics.jsonl and
  round 3 starts from the model of round 2;
- round 3: every site healthy again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.privacy_ledger import PrivacyLedger, count_charge
from common.data.fashion_mnist import DEFAULT_DATA_DIR
from common.secure_round import MESSAGE_MASKED, MESSAGE_SETUP, MESSAGE_UNMASK

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

DRIVER = Path(__file__).with_name("distributed_dp_simulation_driver.py")
FAULTS = {"2:secagg_masked": [2]}


def _session_processes(session: int) -> list[str]:
    """Live processes of the driver's session (other work on the machine is not ours)."""
    out = subprocess.run(["ps", "-eo", "pid,sid,stat,args"], capture_output=True, text=True)
    return [
        line
        for line in out.stdout.splitlines()[1:]
        if int(line.split()[1]) == session and not line.split()[2].startswith("Z")
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("ddp-sim")
    out, spill = base / "run", base / "spill"
    spill.mkdir()
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FEDMM_TEST_FAULTS": json.dumps(FAULTS),
        "FEDMM_SECAGG_SPILL_DIR": str(spill),
    }
    process = subprocess.Popen(
        [sys.executable, str(DRIVER), str(out), "3", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
        start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("distributed-DP simulation did not finish in 480 s")
    finally:
        deadline = time.monotonic() + 20  # Ray's workers exit asynchronously after shutdown
        while (leftovers := _session_processes(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "rows": rows,
        "recording": json.loads((out / "recording.json").read_text()),
        "out": out,
        "log": log,
        "leftovers": leftovers,
    }


def test_rounds_with_all_sites_apply_a_step(run: dict) -> None:
    rows = {row["round"]: row for row in run["rows"]}
    assert sorted(rows) == [1, 2, 3]
    for number in (1, 3):
        assert "aborted" not in rows[number]
        assert rows[number]["sites_trained"] == 3
    assert run["recording"]["integer_update"] is True
    assert run["recording"]["min_survivors"] == 3
    digests = run["recording"]["digests"]
    assert digests["1"] != digests["2"]  # round 1's step changed the model


def test_dropout_below_the_honest_count_discards_the_round_before_unmasking(run: dict) -> None:
    rows = {row["round"]: row for row in run["rows"]}
    assert "discarded before unmasking" in rows[2]["aborted"]
    assert rows[2]["sites_failed"] == 1
    sent = [tuple(entry) for entry in run["recording"]["sent"]]
    assert (2, MESSAGE_MASKED) in sent and (2, MESSAGE_UNMASK) not in sent
    assert (1, MESSAGE_UNMASK) in sent and (3, MESSAGE_UNMASK) in sent
    assert (3, MESSAGE_SETUP) in sent
    digests = run["recording"]["digests"]
    assert digests["3"] == digests["2"]  # the discarded round left the model unchanged


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
    """The driver ends its Ray runtime itself: nothing of its session is left running 20 s
    after it exits (the test kills the session's process group in any case)."""
    assert run["leftovers"] == []
