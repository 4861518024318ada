"""Test-only driver: distributed DP in Flower's simulation runtime, with a fault and a recorder.

Run as a script by ``test_distributed_dp_simulation.py`` (so Ray pickles these apps by
value). The ServerApp is the project's ``run_federation`` in ``dp-mode = "distributed"``; its
Grid records the type and round of every message the coordinator sends, and the aggregation
records a digest of the model each round starts from. The ClientApp runs the project's
handlers unchanged, except that ``$FEDMM_TEST_FAULTS`` (JSON ``{"<round>:<action>": [partition
ids]}``) makes those sites raise in that stage's handler (an error reply: a dropout).

Usage: python distributed_dp_simulation_driver.py OUT_DIR NUM_SITES ROUNDS
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client import app as site
from client import secure_aggregation
from common.federation_config import FederationConfig
from common.secure_round import ACTION_MASKED, ACTION_SETUP, ACTION_SHARE, ACTION_UNMASK
from server.federation import run_federation
from server.secure_aggregation import SecAggPlusAggregation, SecAggSettings
from simulations.local_simulation import SimulationSettings, run_local_simulation

FAULTS_ENV = "FEDMM_TEST_FAULTS"

client_app = ClientApp()


def _round_of(msg: Message) -> int:
    if "config" in msg.content.config_records:
        return int(msg.content.config_records["config"]["server_round"])
    return int(msg.content.config_records["secagg"]["round"])


def _inject_fault(action: str, msg: Message, context: Context) -> None:
    plan = json.loads(os.environ.get(FAULTS_ENV, "{}"))
    round_id = _round_of(msg)
    if int(context.node_config["partition-id"]) in plan.get(f"{round_id}:{action}", []):
        raise RuntimeError(f"injected fault: {action} in round {round_id}")


@client_app.train(ACTION_SETUP)
def setup(msg: Message, context: Context) -> Message:
    _inject_fault(ACTION_SETUP, msg, context)
    return site.secagg_setup(msg, context)


@client_app.train(ACTION_SHARE)
def share(msg: Message, context: Context) -> Message:
    _inject_fault(ACTION_SHARE, msg, context)
    return secure_aggregation.secagg_share(msg, context)


@client_app.train(ACTION_MASKED)
def masked(msg: Message, context: Context) -> Message:
    _inject_fault(ACTION_MASKED, msg, context)
    return secure_aggregation.secagg_masked(msg, context)


@client_app.train(ACTION_UNMASK)
def unmask(msg: Message, context: Context) -> Message:
    _inject_fault(ACTION_UNMASK, msg, context)
    return secure_aggregation.secagg_unmask(msg, context)


class RecordingGrid:
    """The real Grid; the (round, type) of every message sent is kept."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend((_round_of(m), m.metadata.message_type) for m in messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend((_round_of(m), m.metadata.message_type) for m in messages)
        return self.grid.send_and_receive(messages, timeout=timeout)


class RecordingSecAgg(SecAggPlusAggregation):
    """Records a digest of the model each round starts from."""

    def __init__(self, settings: SecAggSettings) -> None:
        super().__init__(settings)
        self.digests: dict[int, str] = {}

    def run_round(self, grid, *, node_ids, global_arrays, train_config, timeout):
        digest = hashlib.sha256()
        for key in global_arrays:
            digest.update(global_arrays[key].numpy().tobytes())
        self.digests[int(train_config["server_round"])] = digest.hexdigest()
        return super().run_round(
            grid,
            node_ids=node_ids,
            global_arrays=global_arrays,
            train_config=train_config,
            timeout=timeout,
        )


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(context.run_config)
    recording_grid = RecordingGrid(grid)
    aggregation = RecordingSecAgg(SecAggSettings.from_federation_config(config))
    try:
        run_federation(recording_grid, config, aggregation=aggregation)  # type: ignore[arg-type]
    finally:
        record = {
            "sent": recording_grid.sent,
            "digests": aggregation.digests,
            "min_survivors": aggregation.settings.min_survivors,
            "integer_update": aggregation.settings.integer_update,
        }
        (Path(config.out_dir) / "recording.json").write_text(json.dumps(record))


def run(out: Path, num_sites: int, rounds: int) -> None:
    config = FederationConfig.from_run_config(
        {
            "num-server-rounds": rounds,
            "min-available-sites": num_sites,
            "min-train-sites": num_sites,
            "site-records-limit": 100,
            "eval-single-items": 200,
            "eval-scenes": 50,
            "eval-every": 2,
            "model-width": 16,
            "model-heads": 2,
            "dp-mode": "distributed",
            "dp-sampling-rate": 0.3,
            "dp-min-honest-sites": num_sites,
            "learning-rate": 1.0,
            "secagg-stage-timeout": 120.0,
            "round-timeout": 300.0,
            "out-dir": str(out.resolve()),
        }
    )
    run_local_simulation(
        config,
        SimulationSettings(num_sites=num_sites, num_cpus_per_site=2),
        client_app=client_app,
        server_app=server_app,
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
