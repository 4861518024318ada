"""SecAgg+ in three exchanges through Flower's simulation runtime, with real DP-SGD.

One 4-site, 4-round run (``simulation_driver.py``, in a subprocess) with the default run
config ``secagg-advertise-next-keys = true`` and federated evaluation after every round:

- round 1: no site has advertised keys yet: setup, share keys, masked input, unmask;
- round 2: every site advertised its round-2 keys in round 1's unmask reply: setup and share
  keys in one exchange, then masked input and unmask;
- round 3: the same, but one site raises in the unmask stage: its input is still summed,
  and it advertises no keys for round 4;
- round 4: that site has no keys, so the round falls back to four exchanges.

The evaluation sums (``evaluate.*``) follow the same pattern with their own keys. The
coordinator's Grid records every message type it sends per round; each decoded training sum
is checked against the sum of the inputs the sites masked (decoded from the files they
waited in), exactly up to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from tests.simulations.simulation_driver import decoded_input, run_driver

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
    ),
]

SITES = 4
FAULTS = {"3:secagg_unmask": [2]}
FOUR = ["secagg_setup", "secagg_share", "secagg_masked", "secagg_unmask"]
THREE = ["secagg_setup_share", "secagg_masked", "secagg_unmask"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("secagg-three")
    dump, spill = base / "site-updates", base / "spill"
    dump.mkdir()
    spill.mkdir()
    driver = run_driver(
        "secagg", base / "run", sites=SITES, rounds=4, faults=FAULTS, dump=dump, spill=spill
    )
    plain = {}
    for path in dump.glob("node-*-round-*.npz"):
        _, node, _, round_id = path.stem.split("-")
        plain[(int(node), int(round_id))] = decoded_input(path)
    return {
        "sent": driver.recording["sent"],
        "rounds": driver.recording["rounds"],
        "plain": plain,
        "rows": driver.metrics(),
        "leftovers": driver.leftovers,
    }


def _exchanges(run: dict, server_round: int, kind: str) -> list[str]:
    """The distinct message types of ``kind`` the coordinator sent in a round, in order."""
    types = [t for r, t in run["sent"] if r == server_round and t.startswith(f"{kind}.")]
    return [t.partition(".")[2] for t in dict.fromkeys(types)]


def test_rounds_after_the_first_run_three_exchanges_until_a_site_has_no_keys(run: dict) -> None:
    for kind in ("train", "evaluate"):
        assert _exchanges(run, 1, kind) == FOUR, kind
        assert _exchanges(run, 2, kind) == THREE, kind
        assert _exchanges(run, 3, kind) == THREE, kind
        assert _exchanges(run, 4, kind) == FOUR, kind  # one site lost at round 3's unmask
    # One message per site per exchange: nothing was sent twice.
    for server_round in (1, 2, 3, 4):
        types = [t for r, t in run["sent"] if r == server_round and t.startswith("train.")]
        assert all(types.count(t) == SITES for t in set(types))


def test_every_round_sums_exactly_the_inputs_the_sites_masked(run: dict) -> None:
    rows = run["rows"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for server_round in (1, 2, 3, 4):
        summary = run["rounds"][server_round]
        assert summary["aborted"] is None
        survivors = summary["survivors"]
        assert len(survivors) == SITES  # the site lost at unmask in round 3 is still summed
        expected = sum(
            plain["update"]
            for (node, r), plain in run["plain"].items()
            if r == server_round and node in survivors
        )
        decoded = np.concatenate(
            [summary["weighted_update_sum"][key].reshape(-1) for key in summary["keys"]]
        )
        assert np.abs(decoded - expected).max() <= 1e-6
        weights = {n: p["weight"] for (n, r), p in run["plain"].items() if r == server_round}
        assert summary["total_weight"] == sum(weights[node] for node in survivors)
    for row in rows:
        assert "aborted" not in row and row["sites_trained"] == SITES
        assert row["federated_eval"]["sites_evaluated"] == SITES
        assert "aborted" not in row["federated_eval"]
    assert "train.secagg_setup_share" in rows[1]["secagg_stage_s"]
    assert "train.secagg_setup" in rows[3]["secagg_stage_s"]


def test_the_run_leaves_no_ray_process(run: dict) -> None:
    assert run["leftovers"] == []
