"""Every kind of round through the one loop, in process, with the site's real ClientApp.

``run_federation`` runs one round of each mode (plain FedAvg, SecAgg+, distributed DP) over
three sites whose ClientApp is the project's own (``client.app.build_client_app``, with the
simulated sites' node config mod), delivered in process (``tests.server.in_process_grid``):
real DP-SGD, real SecAgg+ stages. Every message either side sends is checked for the wire-key
convention (``common.site_task``): record names, and the field names of config and metric
records, in snake_case.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.app import build_client_app
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secure_round import MESSAGE_MASKED, MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_UNMASK
from fedmm.common.site_task import SiteTask
from fedmm.server.aggregation import FedAvgAggregation
from fedmm.server.federation import run_federation
from fedmm.server.round_modes import DistributedDPRounds, LocalDPRounds, round_mode_for
from fedmm.server.secure_aggregation import SecAggPlusAggregation
from fedmm.simulations.simulated_sites import (
    DEID_POLICY_FILE,
    POLICY_FILE,
    SimulatedSiteNodeConfig,
    write_site_deid_policy,
    write_site_policy,
)
from tests.server.in_process_grid import InProcessGrid

NODES = [11, 2**63 + 5, 40]
SECAGG_MESSAGES = (MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_MASKED, MESSAGE_UNMASK)
#: Federated evaluation after the last round: a SecAgg+ sum in every mode.
EVALUATE_MESSAGES = tuple(m.replace("train.", "evaluate.") for m in SECAGG_MESSAGES)
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
MODES = {
    "plain": {"secure-aggregation": False},
    "secagg": {},
    "distributed": {
        "dp-mode": "distributed",
        "dp-sampling-rate": 0.3,
        "dp-min-honest-sites": 3,
    },
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _config(out: Path, mode: str) -> FederationConfig:
    return FederationConfig.from_run_config(
        {
            "num-server-rounds": 1,
            "min-available-sites": 3,
            "min-train-sites": 3,
            "site-records-limit": 60,
            "batch-size": 20,
            "eval-single-items": 50,
            "eval-scenes": 20,
            "model-width": 8,
            "model-heads": 2,
            "out-dir": str(out),
            **MODES[mode],
        }
    )


def _wire_keys(message: Message) -> list[str]:
    """The record names of a message and the field names in its config and metric records
    (an array record's keys are the model's parameter names, data rather than protocol)."""
    if message.has_error():
        return []
    content = message.content
    keys = list(content.keys())
    for records in (content.config_records, content.metric_records):
        for record in records.values():
            keys += list(record.keys())
    return keys


def test_the_run_config_chooses_each_mode_once() -> None:
    plain = round_mode_for(FederationConfig(secure_aggregation=False), dimension=10, num_sites=3)
    assert isinstance(plain, LocalDPRounds)
    assert isinstance(plain.aggregation, FedAvgAggregation)
    secagg = round_mode_for(FederationConfig(), dimension=10, num_sites=3)
    assert isinstance(secagg, LocalDPRounds)
    assert isinstance(secagg.aggregation, SecAggPlusAggregation)
    assert not secagg.aggregation.settings.integer_update
    config = FederationConfig.from_run_config({"dp-mode": "distributed", "dp-min-honest-sites": 3})
    distributed = round_mode_for(config, dimension=1000, num_sites=3)
    assert isinstance(distributed, DistributedDPRounds)
    assert distributed.aggregation.settings.integer_update
    assert distributed.aggregation.settings.min_survivors == 3
    assert distributed.sample([1, 2, 3], rng=None) == [1, 2, 3]  # type: ignore[arg-type]


@pytest.mark.skipif(not DEFAULT_DATA_DIR.exists(), reason="needs dataset-fashion-mnist")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_message_of_every_mode_keeps_the_wire_key_convention(
    mode: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    config = _config(out, mode)
    write_site_policy(out / POLICY_FILE, max_epsilon=config.epsilon, delta=config.delta)
    write_site_deid_policy(out / DEID_POLICY_FILE)
    sites = SimulatedSiteNodeConfig(out_dir=str(out), secagg_spill_dir=str(tmp_path))
    grid = InProcessGrid(NODES, app=build_client_app(mods=[sites]))
    for partition, node in enumerate(NODES):
        grid.contexts[node].node_config.update({"partition-id": partition, "num-partitions": 3})

    run_federation(grid, config)  # type: ignore[arg-type]

    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["sites_trained"] == 3 and "aborted" not in row, row
    federated = row["federated_eval"]
    assert federated["sites_evaluated"] == 3 and federated["records"] > 0, federated
    declared = {msg.content.config_records["config"]["task"] for msg in grid.sent[:3]}
    expected = SiteTask.DISTRIBUTED_DP_STEP if mode == "distributed" else SiteTask.LOCAL_DP_SGD
    assert declared == {expected.value}
    evaluated = {m.content.config_records["config"]["task"] for m in grid.sent[-12:-9]}
    assert evaluated == {SiteTask.FEDERATED_EVAL.value}
    exchanges = {"train"} if mode == "plain" else set(SECAGG_MESSAGES)
    exchanges |= set(EVALUATE_MESSAGES)
    assert set(grid.sent_types()) == exchanges and len(grid.received) == len(grid.sent)
    messages = grid.sent + grid.received
    bad = {key for message in messages for key in _wire_keys(message)}
    bad = {key for key in bad if not SNAKE_CASE.match(key)}
    assert not bad, f"{mode}: wire keys not in snake_case: {sorted(bad)}"
