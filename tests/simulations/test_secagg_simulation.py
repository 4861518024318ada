"""SecAgg+ through Flower's simulation runtime: real Messages, real ClientApps, real DP-SGD.

One 4-site, 4-round run (``simulation_driver.py``, in a subprocess so Ray cannot outlive the
test) with faults injected by a test-only mod on the project's ClientApp. Four sites: the
complete graph with t = 3, and a minimum aggregation size of 3, so one dropout is tolerated:

- round 1: every site healthy;
- round 2: one site raises in the masked-input stage: the round completes with 3 survivors
  (every site advertised keys for round 2 at round 1's unmask, so the round opens with
  setup and share keys in one exchange);
- round 3: two sites raise in the share-keys stage: 2 < 3, the round aborts cleanly;
- round 4: every site healthy again: the run goes on from the unchanged model.

The coordinator's Grid records every reply it receives; the sites' inputs come from a
test-only decoding of the file each site masks (its input, encoded as it waits). The checks:
no payload carries or correlates with a site's input (masked vectors are uniform over
Z_(2^32): chi-square on the top 4 bits), no example count or per-site metric travels in the
clear, and the decoded sum equals the sum of the survivors' inputs exactly (their
quantisation error is tested with the stages).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from tests.simulations.simulation_driver import decoded_input, run_driver

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

SITES = 4
FAULTS = {"2:secagg_masked": [2], "3:secagg_share": [0, 1]}
RECORDS_PER_SITE = 100


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("secagg-sim")
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
        "received": driver.recording["received"],
        "rounds": driver.recording["rounds"],
        "plain": plain,
        "rows": driver.metrics(),
        "leftovers": driver.leftovers,
        "spill": spill,
    }


def _round_of(entry: dict) -> int:
    return int(entry["configs"]["secagg"]["round"]) if "secagg" in entry["configs"] else -1


def _masked_replies(run: dict) -> list[tuple[int, int, np.ndarray]]:
    return [
        (_round_of(e), e["node"], e["arrays"]["masked"][0])
        for e in run["received"]
        if e["type"] == "train.secagg_masked" and e["error"] is None
    ]


def test_masked_vectors_are_uniform_and_uncorrelated_with_every_plain_update(run: dict) -> None:
    from scipy.stats import chisquare

    masked = _masked_replies(run)
    assert len(masked) == 4 + 3 + 4  # rounds 1, 2 (one site failed), 4
    for round_id, _node, vector in masked:
        assert vector.dtype == np.uint32
        updates = [v["update"] for (_, r), v in run["plain"].items() if r == round_id]
        length = updates[0].size
        top_bits = (vector[:length] >> 28).astype(np.int64)
        assert chisquare(np.bincount(top_bits, minlength=16)).pvalue > 1e-4
        as_float = vector[:length].astype(np.float64)
        for update in updates:  # every site's update of that round, its own included
            assert not np.allclose(as_float, update)
            assert abs(np.corrcoef(as_float, update)[0, 1]) < 6 / np.sqrt(length)
            assert abs(np.corrcoef(as_float, np.abs(update))[0, 1]) < 6 / np.sqrt(length)


def test_nothing_else_a_site_sends_can_carry_its_update_count_or_metrics(run: dict) -> None:
    plain = run["plain"]
    # Each site's weight is its public noisy count: one value per site for the whole run.
    weights_by_node: dict[int, set[int]] = {}
    for (node, _round), value in plain.items():
        weights_by_node.setdefault(node, set()).add(value["weight"])
    assert all(len(weights) == 1 for weights in weights_by_node.values())
    counts = {v["weight"] for v in plain.values()}
    per_site_metrics = {round(float(x), 6) for v in plain.values() for x in v["metrics"]}
    for entry in run["received"]:
        if entry["error"] is not None:
            continue
        assert set(entry["arrays"]) <= {"masked"}
        assert set(entry["metrics"]) <= {"privacy"}
        assert all(set(m) == {"epsilon"} for m in entry["metrics"].values())
        for name, record in entry["configs"].items():
            for key, value in record.items():
                assert "example" not in key and "weight" not in key and "loss" not in key
                values = value if isinstance(value, list) else [value]
                for item in values:
                    if isinstance(item, bytes):
                        assert len(item) <= 160, (name, key)  # keys, sealed bundles, shares
                    elif isinstance(item, int | float) and not isinstance(item, bool):
                        assert item not in counts, (name, key)
                        assert round(float(item), 6) not in per_site_metrics, (name, key)


def test_the_masked_sum_decodes_to_exactly_the_sum_of_the_waiting_inputs(run: dict) -> None:
    for round_id in (1, 2, 4):
        summary = run["rounds"][round_id]
        assert summary["aborted"] is None
        survivors = summary["survivors"]
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
        weights = {node: p["weight"] for (node, r), p in run["plain"].items() if r == round_id}
        assert summary["total_weight"] == sum(weights[node] for node in survivors)


def test_a_dropout_above_the_threshold_is_tolerated(run: dict) -> None:
    row = run["rows"][1]
    assert row["round"] == 2 and "aborted" not in row
    assert row["sites_trained"] == 3 and row["sites_failed"] == 1
    failed = [o for o in run["rounds"][2]["outcomes"] if o[1] == "failed"]
    assert len(failed) == 1 and "train.secagg_masked" in failed[0][2]
    # No site's train loss reaches the coordinator: the loss curve is the global model's on
    # the coordinator's own held-out data.
    assert "train_loss" not in row and 0 < row["eval_loss"] < 10


def test_below_the_threshold_the_round_aborts_and_the_next_round_runs(run: dict) -> None:
    rows = run["rows"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert "2 sites shared keys, fewer than 3" in rows[2]["aborted"]
    assert rows[2]["sites_failed"] == 2
    assert "aborted" not in rows[3] and rows[3]["sites_trained"] == 4
    # The aborted round left the model unchanged: round 4 started from round 3's model.
    assert run["rounds"][4]["model_digest"] == run["rounds"][3]["model_digest"]
    assert run["rounds"][3]["model_digest"] != run["rounds"][2]["model_digest"]
    # Sites report the bound they committed to, never their exact spend.
    assert {r["epsilon_bound_max"] for r in rows if "aborted" not in r} == {3.0}


def test_the_run_leaves_no_ray_process_and_no_waiting_update(run: dict) -> None:
    assert run["leftovers"] == []
    # Updates are removed once masked; only the aborted round's survivors could keep one,
    # and they are discarded at the next setup.
    assert not list(run["spill"].rglob("pending-round-*"))
