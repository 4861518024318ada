"""Active-coordinator mode through Flower's simulation runtime: real DP-SGD, real roster.

One 4-site, 2-round run (``simulation_driver.py`` kind ``secagg-active``, in a subprocess so
Ray cannot outlive the test), as ``fedmm simulate --set secagg-active-coordinator=true``
runs it: the simulation makes a roster of its sites, every site signs it and pins its
digest, and demands the mode. Round 1: every site healthy; round 2: one site raises in the
consistency stage (it signs nothing, but its input is in the sum). The checks: every round
ran the five exchanges, the decoded sums equal the plain weighted sums of the survivors
within the stated bound, the roster keys are private files, and nothing is left running.
"""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from tests.simulations.simulation_driver import decoded_input, run_driver

pytestmark = [
    pytest.mark.skipif(
        not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
    ),
    pytest.mark.slow,
]

SITES = 4
FAULTS = {"2:secagg_consistency": [1]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("secagg-active-sim")
    dump, spill = base / "site-updates", base / "spill"
    dump.mkdir()
    spill.mkdir()
    out = base / "run"
    driver = run_driver(
        "secagg-active", out, sites=SITES, rounds=2, faults=FAULTS, dump=dump, spill=spill
    )
    plain = {}
    for path in dump.glob("node-*-round-*.npz"):
        _, node, _, round_id = path.stem.split("-")
        plain[int(node), int(round_id)] = decoded_input(path)
    return {"driver": driver, "plain": plain, "out": out}


def test_every_round_runs_the_consistency_exchange(run: dict) -> None:
    sent = {kind for _, kind in run["driver"].recording["sent"]}
    assert "train.secagg_consistency" in sent
    rows = run["driver"].metrics()
    assert [row["round"] for row in rows] == [1, 2]
    assert all("aborted" not in row and row["sites_trained"] == SITES for row in rows)
    assert all("train.secagg_consistency" in row["secagg_stage_s"] for row in rows)


def test_the_sum_is_exactly_the_sum_of_the_inputs_as_they_waited(run: dict) -> None:
    for round_id in (1, 2):
        summary = run["driver"].recording["rounds"][round_id]
        assert summary["aborted"] is None
        survivors = summary["survivors"]
        assert len(survivors) == SITES  # the site that did not sign is still in the sum
        expected = sum(
            plain["update"]  # weight * clipped update, as it waited (dequantised)
            for (node, r), plain in run["plain"].items()
            if r == round_id and node in survivors
        )
        decoded = np.concatenate(
            [summary["weighted_update_sum"][key].reshape(-1) for key in summary["keys"]]
        )
        # Every mask cancels: the same integers summed, up to float64 rounding.
        assert np.abs(decoded - expected).max() <= 1e-6


def test_the_simulation_made_a_signed_roster_with_private_keys(run: dict) -> None:
    roster_dir = run["out"] / "site-roster"
    roster = json.loads((roster_dir / "roster.json").read_text())
    assert sorted(roster["signatures"]) == [f"site-{i}" for i in range(SITES)]
    for site in range(SITES):
        key = roster_dir / f"site-{site}" / "roster-signing-key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    policy = (run["out"] / "site-policy.toml").read_text()
    assert "require-active-coordinator = true" in policy and "roster-digest" in policy


def test_the_run_leaves_no_ray_process(run: dict) -> None:
    assert run["driver"].leftovers == []
