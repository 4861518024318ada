"""Test-only driver: the project's apps in Flower's simulation runtime, with a recorder.

Run as a script by ``test_secagg_simulation.py`` (a script, so Ray pickles these apps by
value). The ServerApp is the project's ``run_federation`` with SecAgg+, but its Grid records
every reply the coordinator receives, and the aggregation records what it decoded. The
ClientApp runs the project's handlers unchanged, plus two test-only hooks:

- after ``secagg_setup``, the site's plain update (the node-private file it masks later) is
  copied to ``$FEDMM_TEST_SITE_DUMP``, so the test can compare it with what the coordinator
  received; the production ClientApp has no such hook;
- ``$FEDMM_TEST_FAULTS`` (JSON ``{"<round>:<action>": [partition ids]}``) makes those sites
  raise in that stage's handler: Flower turns that into an error reply (a dropout).

Usage: python secagg_simulation_driver.py OUT_DIR NUM_SITES ROUNDS
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
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

DUMP_ENV = "FEDMM_TEST_SITE_DUMP"
FAULTS_ENV = "FEDMM_TEST_FAULTS"

client_app = ClientApp()


def _inject_fault(action: str, msg: Message, context: Context) -> None:
    plan = json.loads(os.environ.get(FAULTS_ENV, "{}"))
    if action == ACTION_SETUP:
        round_id = int(msg.content.config_records["config"]["server_round"])
    else:
        round_id = int(msg.content.config_records["secagg"]["round"])
    if int(context.node_config["partition-id"]) in plan.get(f"{round_id}:{action}", []):
        raise RuntimeError(f"injected fault: {action} in round {round_id}")


@client_app.train(ACTION_SETUP)
def setup(msg: Message, context: Context) -> Message:
    _inject_fault(ACTION_SETUP, msg, context)
    reply = site.secagg_setup(msg, context)
    record = context.state.config_records.get(secure_aggregation.SECAGG_STATE_KEY)
    if record is not None and os.environ.get(DUMP_ENV):
        round_id = int(msg.content.config_records["config"]["server_round"])
        target = Path(os.environ[DUMP_ENV]) / f"node-{context.node_id}-round-{round_id}.npy"
        shutil.copyfile(str(record["pending-file"]), target)
    return reply


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
    """The real Grid; every reply the coordinator pulls is kept (as plain data)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.received: list[dict] = []
        self.sent: dict[str, Message] = {}

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        self.sent.update({m.metadata.message_id: m for m in messages})
        return ids

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self._record(reply, self.sent.get(reply.metadata.reply_to_message_id))
        return replies

    def _record(self, reply, request) -> None:
        entry = {
            "type": request.metadata.message_type if request else "?",
            "node": request.metadata.dst_node_id if request else None,
            "error": reply.error.reason if reply.has_error() else None,
            "configs": {},
            "metrics": {},
            "arrays": {},
        }
        if not reply.has_error():
            content = reply.content
            entry["configs"] = {k: dict(v) for k, v in content.config_records.items()}
            entry["metrics"] = {k: dict(v) for k, v in content.metric_records.items()}
            entry["arrays"] = {k: v.to_numpy_ndarrays() for k, v in content.array_records.items()}
        self.received.append(entry)


class RecordingSecAgg(SecAggPlusAggregation):
    """Records, per round, the model it was given and what it decoded."""

    def __init__(self, settings: SecAggSettings) -> None:
        super().__init__(settings)
        self.rounds: list[dict] = []

    def run_round(self, grid, *, node_ids, global_arrays, train_config, timeout):
        digest = hashlib.sha256()
        for key in global_arrays:
            digest.update(global_arrays[key].numpy().tobytes())
        result = super().run_round(
            grid,
            node_ids=node_ids,
            global_arrays=global_arrays,
            train_config=train_config,
            timeout=timeout,
        )
        summed = result.weighted_update_sum
        self.rounds.append(
            {
                "round": int(train_config["server_round"]),
                "model_digest": digest.hexdigest(),
                "keys": list(global_arrays.keys()),
                "weighted_update_sum": summed,
                "total_weight": result.total_weight,
                "survivors": list(self.last_round.survivors),
                "update_error_bound": self.last_round.update_error_bound,
                "aborted": result.aborted,
                "outcomes": [(o.node_id, o.status, o.reason) for o in result.outcomes],
            }
        )
        return result


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(context.run_config)
    recording_grid = RecordingGrid(grid)
    aggregation = RecordingSecAgg(SecAggSettings.from_federation_config(config))
    try:
        run_federation(recording_grid, config, aggregation=aggregation)  # type: ignore[arg-type]
    finally:
        with open(Path(config.out_dir) / "recording.pkl", "wb") as handle:
            pickle.dump({"received": recording_grid.received, "rounds": aggregation.rounds}, handle)


def run(out: Path, num_sites: int, rounds: int) -> None:
    config = FederationConfig.from_run_config(
        {
            "num-server-rounds": rounds,
            "min-available-sites": num_sites,
            "min-train-sites": num_sites,
            "site-records-limit": 100,
            "eval-single-items": 200,
            "eval-scenes": 50,
            "batch-size": 50,
            "model-width": 16,
            "model-heads": 2,
            "secure-aggregation": True,
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
