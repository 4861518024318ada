"""Test-only driver: the project's apps in Flower's simulation runtime, with faults and a recorder.

The tests call :func:`run_driver`, which runs this file as a script in a subprocess in its
own session (so neither Ray nor anything else it starts can outlive the test; run as a
script, Ray pickles its mods by value), and reads back what it recorded. The ServerApp is the
project's ``run_federation`` with the run's own mode, wrapped so that it records every reply
the coordinator receives, every message it sends, and per round the model it started from and
what it decoded. The ClientApp is the project's (``client.app.build_client_app``) with two
test-only mods after the simulated sites' own:

- ``--faults`` (JSON ``{"<round>:<action>": [partition ids]}``) makes those sites raise in
  that stage's handler: Flower turns that into an error reply (a dropout);
- ``--dump DIR``: after setup, the site's input as it waits to be masked (the node-private
  file, encoded in the round's ring) is decoded with the round's config and written to DIR
  (``decoded_input``: the weighted, clipped update, the weight and the weighted metrics), so
  a test can compare it with what the coordinator received; the production ClientApp has
  no such hook.

Usage: python simulation_driver.py {secagg,secagg-active,distributed} OUT_DIR SITES ROUNDS
    [--faults JSON] [--dump DIR] [--spill DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from fedmm.client.secagg.pending_update import load_pending_update
from fedmm.client.secagg.stages import client_state_from_record
from fedmm.client.secure_aggregation import SECAGG_STATE_KEY
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secagg.input_encoding import decode_aggregate
from fedmm.common.secure_round import MESSAGE_SETUP, MESSAGE_SETUP_SHARE, RECORD_SECAGG
from fedmm.server.federation import run_federation
from fedmm.server.round_modes import round_mode_for
from fedmm.simulations.local_simulation import SimulationSettings, run_local_simulation

#: The run config of each kind of simulation the tests drive.
RUNS: dict[str, dict[str, Any]] = {
    "secagg": {
        "site-records-limit": 100,
        "eval-single-items": 200,
        "eval-scenes": 50,
        "eval-every": 1,
        "batch-size": 50,
        "model-width": 16,
        "model-heads": 2,
        "secure-aggregation": True,
        "secagg-stage-timeout": 120.0,
        "round-timeout": 300.0,
    },
    # SecAgg+ against an actively malicious coordinator: the simulation makes and pins a
    # roster of its sites (``simulations.simulated_roster``).
    "secagg-active": {
        "site-records-limit": 100,
        "eval-single-items": 200,
        "eval-scenes": 50,
        "batch-size": 50,
        "model-width": 16,
        "model-heads": 2,
        "secure-aggregation": True,
        "secagg-active-coordinator": True,
        "secagg-stage-timeout": 120.0,
        "round-timeout": 300.0,
    },
    "distributed": {
        "site-records-limit": 100,
        "eval-single-items": 200,
        "eval-scenes": 50,
        "eval-every": 2,
        "model-width": 16,
        "model-heads": 2,
        "dp-mode": "distributed",
        "dp-sampling-rate": 0.3,
        "learning-rate": 1.0,
        "secagg-stage-timeout": 120.0,
        "round-timeout": 300.0,
    },
}
RECORDING = "recording.pkl"


def round_of(msg: Message) -> int:
    """The round a request or reply belongs to (-1 for none)."""
    records = msg.content.config_records
    if "config" in records:
        return int(records["config"]["server_round"])
    if RECORD_SECAGG in records:
        return int(records[RECORD_SECAGG]["round"])
    return -1


@dataclass(frozen=True)
class InjectFaults:
    """A mod: the sites named for a round and action raise in that handler."""

    plan: dict[str, list[int]]

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        action = msg.metadata.message_type.partition(".")[2] or "train"
        round_id = round_of(msg)
        if int(context.node_config["partition-id"]) in self.plan.get(f"{round_id}:{action}", []):
            raise RuntimeError(f"injected fault: {action} in round {round_id}")
        return call_next(msg, context)


@dataclass(frozen=True)
class CopyPendingUpdate:
    """A mod: after a training sum's setup (or setup and share keys), decode the site's
    waiting input into ``directory`` (an evaluation sum's counts are not an update)."""

    directory: str

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        record = context.state.config_records.get(SECAGG_STATE_KEY)
        first = msg.metadata.message_type in (MESSAGE_SETUP, MESSAGE_SETUP_SHARE)
        if first and record is not None:
            state_record = {k: v for k, v in dict(record).items() if k != "exchange"}
            config = client_state_from_record(state_record).config
            pending = load_pending_update(
                Path(str(record["pending-file"])), round_id=config.round_id
            )
            decoded = decode_aggregate(config=config, summed=pending.encoded, num_summed=1)
            name = f"node-{context.node_id}-round-{round_of(msg)}.npz"
            np.savez(
                Path(self.directory) / name,
                update=decoded.weighted_update_sum,
                weight=decoded.weight_sum,
                metrics=np.array(list(decoded.metric_sums.values())),
            )
        return reply


def decoded_input(path: Path) -> dict[str, Any]:
    """A dumped input: ``update`` (weight * clipped update, dequantised), ``weight`` (the
    site's example count) and ``metrics`` (weighted, dequantised)."""
    with np.load(path) as arrays:
        return {
            "update": arrays["update"],
            "weight": int(arrays["weight"]),
            "metrics": [float(x) for x in arrays["metrics"]],
        }


class RecordingGrid:
    """The real Grid; every message sent and every reply pulled is kept (as plain data)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: list[tuple[int, str]] = []
        self.received: list[dict] = []
        self._requests: dict[str, Message] = {}

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return self.grid.get_node_ids()

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        self.sent.extend((round_of(m), m.metadata.message_type) for m in messages)
        self._requests.update({m.metadata.message_id: m for m in messages})
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self._record(reply, self._requests.get(reply.metadata.reply_to_message_id))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.sent.extend((round_of(m), m.metadata.message_type) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        requests = {m.metadata.message_id: m for m in messages}  # ids exist once pushed
        for reply in replies:
            self._record(reply, requests.get(reply.metadata.reply_to_message_id))
        return replies

    def _record(self, reply: Message, request: Message | None) -> None:
        entry: dict[str, Any] = {
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


@dataclass
class RecordingMode:
    """The run's own mode; per round, the model it started from and what it decoded."""

    mode: Any
    rounds: list[dict] = field(default_factory=list)

    @property
    def server_state(self):  # type: ignore[no-untyped-def]
        return self.mode.server_state

    def sample(self, node_ids, rng):  # type: ignore[no-untyped-def]
        return self.mode.sample(node_ids, rng)

    def step(self, weights, aggregate, *, server_round):  # type: ignore[no-untyped-def]
        return self.mode.step(weights, aggregate, server_round=server_round)

    def privacy_statement(self) -> str:
        return self.mode.privacy_statement()

    def run_round(self, grid, *, server_round, node_ids, weights):  # type: ignore[no-untyped-def]
        digest = hashlib.sha256()
        for value in weights.values():
            digest.update(value.numpy().tobytes())
        result = self.mode.run_round(
            grid, server_round=server_round, node_ids=node_ids, weights=weights
        )
        report = self.mode.aggregation.last_round
        self.rounds.append(
            {
                "round": server_round,
                "model_digest": digest.hexdigest(),
                "keys": list(weights),
                "weighted_update_sum": result.weighted_update_sum,
                "total_weight": result.total_weight,
                "survivors": list(report.survivors),
                "update_error_bound": report.update_error_bound,
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
    modes: list[RecordingMode] = []

    def choose(config: FederationConfig, **sizes: int) -> RecordingMode:
        modes.append(RecordingMode(round_mode_for(config, **sizes)))
        return modes[0]

    try:
        run_federation(recording_grid, config, choose_mode=choose)  # type: ignore[arg-type]
    finally:
        settings = modes[0].mode.aggregation.settings if modes else None
        recording = {
            "sent": recording_grid.sent,
            "received": recording_grid.received,
            "rounds": {r["round"]: r for r in modes[0].rounds} if modes else {},
            "min_survivors": getattr(settings, "min_survivors", None),
            "integer_update": getattr(settings, "integer_update", None),
        }
        with open(Path(config.out_dir) / RECORDING, "wb") as handle:
            pickle.dump(recording, handle)


def simulate(args: argparse.Namespace) -> None:
    config = FederationConfig.from_run_config(
        {
            **RUNS[args.kind],
            "num-server-rounds": args.rounds,
            "min-available-sites": args.sites,
            "min-train-sites": args.sites,
            **({"dp-min-honest-sites": args.sites} if args.kind == "distributed" else {}),
            "out-dir": str(args.out.resolve()),
        }
    )
    mods: list[Any] = [InjectFaults(json.loads(args.faults))]
    if args.dump:
        mods.append(CopyPendingUpdate(str(args.dump)))
    run_local_simulation(
        config,
        SimulationSettings(
            num_sites=args.sites, num_cpus_per_site=2, secagg_spill_dir=str(args.spill or "")
        ),
        server_app=server_app,
        client_mods=mods,
    )


@dataclass
class DriverRun:
    """What a driver run left: its output folder, log, recording, and leftover processes."""

    out: Path
    log: str
    recording: dict
    leftovers: list[int]

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]


def run_driver(
    kind: str,
    out: Path,
    *,
    sites: int,
    rounds: int,
    faults: dict[str, list[int]],
    dump: Path | None = None,
    spill: Path | None = None,
    timeout: float = 480.0,
) -> DriverRun:
    """Run this driver in a subprocess of its own session; fail the test when it fails or
    outlives ``timeout``. Every process it started is found by an environment marker
    (``tests.simulations.marked_processes``); what is still running 30 s after it exited is
    reported in ``leftovers`` (then stopped)."""
    import pytest

    from tests.simulations.marked_processes import new_marker, none_left, processes_marked

    marker = new_marker()
    argv = [sys.executable, __file__, kind, str(out), str(sites), str(rounds)]
    argv += ["--faults", json.dumps(faults)]
    argv += ["--dump", str(dump)] if dump else []
    argv += ["--spill", str(spill)] if spill else []
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **marker, "FLWR_TELEMETRY_ENABLED": "0"},
        cwd=Path(__file__).parents[2],
        start_new_session=True,  # one process group: nothing it starts can outlive the test
    )
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"{kind} simulation did not finish in {timeout:.0f} s:\n{log[-3000:]}")
    leftovers = [] if none_left(marker) else sorted(processes_marked(marker))
    for pid in leftovers:  # only what this run started (it carries the run's marker)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    assert process.returncode == 0, log[-4000:]
    with open(out / RECORDING, "rb") as handle:
        recording = pickle.load(handle)
    return DriverRun(out=out, log=log, recording=recording, leftovers=leftovers)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(RUNS))
    parser.add_argument("out", type=Path)
    parser.add_argument("sites", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("--faults", default="{}")
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--spill", type=Path)
    simulate(parser.parse_args())
