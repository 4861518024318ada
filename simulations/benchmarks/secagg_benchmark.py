"""Round wall time and bytes per site: this project's SecAgg+ against plain FedAvg.

Both run in the same Flower simulation (Ray backend, one actor on 2 cores), one after the
other, with a dummy ClientApp that returns a fixed-length random update instead of training,
so the figures are the cost of aggregation and transport alone. For each number of sites (one
simulation each) and each vector length, the coordinator runs ``--repeats`` rounds of each
kind (alternating) and reports the median wall time, the ratio SecAgg+/FedAvg, and the bytes
each site sends and receives (Flower's protobuf encoding of the message contents). The
SecAgg+ sites run the real ClientApp stage handlers of ``client.app``; only training is
replaced.

With ``--flower-legacy``, Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``)
runs too, in its own simulation after ours: it works only on the legacy API (NumPyClient,
LegacyContext, DefaultWorkflow; see NOTES). Its clients return the same kind of random
update; ``num_shares`` = k + 1 and ``reconstruction_threshold`` = t of our defaults. Its
round time is the median gap between successive ``aggregate_fit`` calls.

Usage (prints JSON):

    python -m simulations.benchmarks.secagg_benchmark --sites 10 --lengths 100000 --flower-legacy
    python -m simulations.benchmarks.secagg_benchmark --sites 10 50 100 --lengths 100000 1000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from client import app as site
from common.secure_round import ACTION_MASKED, ACTION_SETUP, ACTION_SHARE, ACTION_UNMASK

PLAN_ENV = "FEDMM_SECAGG_BENCH_PLAN"

client_app = ClientApp()


def _random_update(length: int, context: Context, server_round: int) -> np.ndarray:
    rng = np.random.default_rng([int(context.node_id) % 2**32, server_round])
    return rng.normal(0.0, 0.01, length)


@client_app.train()
def plain_train(msg: Message, context: Context) -> Message:
    length = int(msg.content.config_records["config"]["length"])
    server_round = int(msg.content.config_records["config"]["server_round"])
    update = _random_update(length, context, server_round).astype(np.float32)
    content = RecordDict(
        {
            "update": ArrayRecord({"model": Array(update)}),
            "metrics": MetricRecord({"num-examples": 100, "train-loss": 1.0, "steps": 1}),
        }
    )
    return Message(content, reply_to=msg)


def _dummy_trainer(request, msg: Message, context: Context) -> site.LocalUpdate:
    length = sum(math.prod(a.shape) for a in msg.content.array_records["arrays"].values())
    return site.LocalUpdate(
        update=_random_update(length, context, request.server_round),
        num_examples=100,
        train_loss=1.0,
        steps=1,
        epsilon=1.0,
    )


@client_app.train(ACTION_SETUP)
def setup(msg: Message, context: Context) -> Message:
    return site.run_secagg_setup(msg, context, train=_dummy_trainer)


client_app.train(ACTION_SHARE)(site.secagg_share)
client_app.train(ACTION_MASKED)(site.secagg_masked)
client_app.train(ACTION_UNMASK)(site.secagg_unmask)


class CountingGrid:
    """The real Grid; counts the encoded bytes of every message sent and received."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent = 0
        self.received = 0
        self.counting_s = 0.0

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def reset(self) -> None:
        self.sent = self.received = 0
        self.counting_s = 0.0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        started = time.perf_counter()
        self.sent += sum(recorddict_to_proto(m.content).ByteSize() for m in messages)
        self.counting_s += time.perf_counter() - started
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        started = time.perf_counter()
        self.received += sum(
            recorddict_to_proto(r.content).ByteSize() for r in replies if not r.has_error()
        )
        self.counting_s += time.perf_counter() - started
        return replies


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from common.federation_config import FederationConfig
    from common.train_request import TrainRequest
    from server.aggregation import FedAvgAggregation, wait_for_sites
    from server.secure_aggregation import SecAggPlusAggregation, SecAggSettings

    plan = json.loads(os.environ[PLAN_ENV])
    num_sites = plan["sites"]
    nodes = wait_for_sites(grid, num_sites, timeout=120.0)[:num_sites]
    counting = CountingGrid(grid)
    kinds = {
        "fedavg": FedAvgAggregation(),
        "secagg+": SecAggPlusAggregation(SecAggSettings(update_clip=1.0, max_weight=1000)),
    }
    results = []
    server_round = 0
    for length in plan["lengths"]:
        model = ArrayRecord({"model": Array(np.zeros(length, dtype=np.float32))})
        timings: dict[str, list[float]] = {kind: [] for kind in kinds}
        traffic: dict[str, tuple[int, int]] = {}
        for repeat in range(plan["repeats"] + 1):  # the first pair warms the actor up
            for kind, aggregation in kinds.items():
                server_round += 1
                train_config = TrainRequest.for_round(FederationConfig(), server_round).to_config()
                counting.reset()
                started = time.perf_counter()
                aggregate = aggregation.run_round(
                    counting,  # type: ignore[arg-type]
                    node_ids=nodes,
                    global_arrays=model,
                    train_config=ConfigRecord({**train_config, "length": length}),
                    timeout=600.0,
                )
                elapsed = time.perf_counter() - started - counting.counting_s
                if aggregate.aborted or aggregate.count("trained") != num_sites:
                    raise RuntimeError(f"{kind} round failed: {aggregate.aborted}")
                if repeat > 0:
                    timings[kind].append(elapsed)
                if kind == "secagg+":
                    exchanges = dict(aggregation.last_round.exchange_seconds)
                traffic[kind] = (counting.sent // num_sites, counting.received // num_sites)
        fedavg_s = statistics.median(timings["fedavg"])
        secagg_s = statistics.median(timings["secagg+"])
        results.append(
            {
                "sites": num_sites,
                "length": length,
                "fedavg_round_s": round(fedavg_s, 3),
                "secagg_round_s": round(secagg_s, 3),
                "time_ratio": round(secagg_s / fedavg_s, 2),
                "fedavg_bytes_per_site": {"down": traffic["fedavg"][0], "up": traffic["fedavg"][1]},
                "secagg_bytes_per_site": {
                    "down": traffic["secagg+"][0],
                    "up": traffic["secagg+"][1],
                },
                "bytes_ratio": round(sum(traffic["secagg+"]) / sum(traffic["fedavg"]), 3),
                "secagg_exchange_s_last_round": {k: round(v, 3) for k, v in exchanges.items()},
                "secagg_degree": kinds["secagg+"].last_round.degree,
                "secagg_threshold": kinds["secagg+"].last_round.threshold,
                "repeats": plan["repeats"],
            }
        )
    Path(plan["out"]).write_text(json.dumps(results))


# --- Flower's legacy SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), for comparison ----------


def _legacy_client_fn(context: Context):
    from flwr.client import NumPyClient

    class RandomUpdateClient(NumPyClient):
        def fit(self, parameters, config):
            length = parameters[0].size
            update = _random_update(length, context, int(config.get("server_round", 0)))
            return [update.astype(np.float32)], 100, {}

    return RandomUpdateClient().to_client()


def _legacy_client_app() -> ClientApp:
    from flwr.client.mod import secaggplus_mod

    return ClientApp(client_fn=_legacy_client_fn, mods=[secaggplus_mod])


def _timed_fedavg_class():
    from flwr.server.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        """FedAvg that notes when each round's aggregation finished."""

        def __init__(self, finished: list[float], num_sites: int, **kwargs) -> None:
            super().__init__(**kwargs)
            self.finished = finished
            self.num_sites = num_sites

        def aggregate_fit(self, server_round, results, failures):
            if failures or len(results) != self.num_sites:
                raise RuntimeError(f"legacy round {server_round}: {len(failures)} failures")
            out = super().aggregate_fit(server_round, results, failures)
            self.finished.append(time.perf_counter())
            return out

    return TimedFedAvg


legacy_server_app = ServerApp()


@legacy_server_app.main()
def legacy_main(grid: Grid, context: Context) -> None:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from common.secagg.neighbour_graph import default_graph_parameters
    from server.aggregation import wait_for_sites

    plan = json.loads(os.environ[PLAN_ENV])
    num_sites = plan["sites"]
    wait_for_sites(grid, num_sites, timeout=120.0)
    graph = default_graph_parameters(num_sites)
    _TimedFedAvg = _timed_fedavg_class()
    counting = CountingGrid(grid)
    results = []
    for length in plan["lengths"]:
        finished: list[float] = []

        strategy = _TimedFedAvg(
            finished,
            num_sites,
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num_sites,
            min_available_clients=num_sites,
            initial_parameters=ndarrays_to_parameters([np.zeros(length, dtype=np.float32)]),
        )
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=plan["repeats"] + 1), strategy=strategy
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=graph.degree + 1, reconstruction_threshold=graph.threshold
            )
        )
        counting.reset()
        workflow(counting, legacy)  # type: ignore[arg-type]
        rounds = [b - a for a, b in itertools.pairwise(finished)]
        results.append(
            {
                "sites": num_sites,
                "length": length,
                "flower_secaggplus_round_s": round(statistics.median(rounds), 3),
                "num_shares": graph.degree + 1,
                "reconstruction_threshold": graph.threshold,
                "rounds_timed": len(rounds),
                "flower_bytes_per_site_per_round": {
                    "down": counting.sent // num_sites // (plan["repeats"] + 1),
                    "up": counting.received // num_sites // (plan["repeats"] + 1),
                },
            }
        )
    Path(plan["out"]).write_text(json.dumps(results))


def run_flower_legacy(num_sites: int, lengths: list[int], repeats: int) -> list[dict]:
    """Flower's own SecAgg+ on the legacy API, in its own simulation."""
    return _simulate(num_sites, lengths, repeats, _legacy_client_app(), legacy_server_app)


def run(num_sites: int, lengths: list[int], repeats: int) -> list[dict]:
    return _simulate(num_sites, lengths, repeats, client_app, server_app)


def _simulate(
    num_sites: int, lengths: list[int], repeats: int, clients: ClientApp, server: ServerApp
) -> list[dict]:
    from common.federation_config import FederationConfig
    from simulations.local_simulation import SimulationSettings, run_local_simulation

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "results.json"
        os.environ[PLAN_ENV] = json.dumps(
            {"sites": num_sites, "lengths": lengths, "repeats": repeats, "out": str(out)}
        )
        os.environ.setdefault("FEDMM_SECAGG_SPILL_DIR", scratch)
        config = FederationConfig.from_run_config({"out-dir": str(Path(scratch) / "run")})
        run_local_simulation(
            config,
            SimulationSettings(num_sites=num_sites, num_cpus_per_site=2),
            client_app=clients,
            server_app=server,
        )
        return json.loads(out.read_text())


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--flower-legacy", action="store_true", help="also run Flower's legacy SecAgg+"
    )
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    started = time.perf_counter()
    rows = [row for n in args.sites for row in run(n, args.lengths, args.repeats)]
    if args.flower_legacy:
        for n in args.sites:
            for legacy in run_flower_legacy(n, args.lengths, args.repeats):
                row = next(r for r in rows if (r["sites"], r["length"]) == (n, legacy["length"]))
                row["flower_legacy"] = legacy
                row["secagg_vs_flower_legacy_time_ratio"] = round(
                    row["secagg_round_s"] / legacy["flower_secaggplus_round_s"], 2
                )
    print(
        json.dumps(
            {
                "benchmark": "secagg+ vs fedavg, Flower simulation runtime (Ray, one actor)",
                "cpu_count": os.cpu_count(),
                "results": rows,
                "fixed_cost_10_sites_100k": next(
                    (
                        {
                            "secagg_round_s": r["secagg_round_s"],
                            "fedavg_round_s": r["fedavg_round_s"],
                            "overhead_s": round(r["secagg_round_s"] - r["fedavg_round_s"], 3),
                        }
                        for r in rows
                        if r["sites"] == 10 and r["length"] == 100_000
                    ),
                    None,
                ),
                "flower_legacy_secaggplus": "in each row as flower_legacy"
                if args.flower_legacy
                else "not measured (pass --flower-legacy)",
                "wall_s": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    cli()
