"""Round wall time and bytes per site: this project's SecAgg+ against plain FedAvg.

SecAgg+ after Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (and Bonawitz et al., CCS 2017, for the complete graph). Both kinds run in the same
Flower simulation (Ray backend; by default one actor on 2 cores, as the project's simulation
runs), one after the other, with a dummy ClientApp that returns a fixed-length random update
instead of training, so the figures are the cost of aggregation and transport alone. For
each number of sites (one simulation each) and each vector length, the coordinator runs
``--repeats`` timed rounds of each kind after one warm-up round each, alternating, and
reports the medians, the ratios, and the bytes each site sends and receives (Flower's
protobuf encoding of the message contents). The SecAgg+ sites run the real stage handlers of
``client.secure_aggregation``; only training is replaced.

Four kinds of round, side by side:

- ``fedavg``: ``FedAvgAggregation`` as the project runs it (``Grid.send_and_receive``, which
  polls for replies every 0.1 s in simulation);
- ``fedavg_fast_poll``: the same with SecAgg+'s reply polling (``poll_replies`` with
  ``PROTOCOL_POLL``), so the ratio can also be read with equal polling;
- ``secagg+``: ``SecAggPlusAggregation`` with ``advertise_next_keys`` off: four exchanges
  every round;
- ``secagg+3``: the same with ``advertise_next_keys`` on (the run config's default): the sites
  advertise their next round's keys at unmask, so every timed round (after the warm-up)
  runs setup and share keys in one exchange, three in all (``secagg3_*`` in the JSON);
- ``secagg+active`` (``--active``): the same in active-coordinator mode (Bonawitz et al.,
  CCS 2017, section 6): round keys signed with each site's roster key and verified against
  the roster, the graph seeded by their hash, keys and bundles bound to the round, and a
  fifth exchange, the consistency check. The simulation makes and signs a roster of its
  sites (``simulations.simulated_roster``); the sites pin it without demanding the mode, so
  both kinds run in one simulation. ``active_time_ratio`` is its round time over
  ``secagg+``'s.

With ``--flower-legacy``, Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``)
runs too, in its own simulation after ours: it works only on the legacy API (NumPyClient,
LegacyContext, DefaultWorkflow: with the Message API's FedAvg every node fails with
``KeyError 'secaggplus_configs'``). Its clients return the same kind of random
update; ``num_shares`` = k + 1 and ``reconstruction_threshold`` = t of our defaults. Its
round time is the median gap between successive ``aggregate_fit`` calls.

Each row also gives the peak RSS of the Ray actor and of this process, and the JSON the load
average of the machine at the start and the end. Progress rows go to stderr.

Usage (prints JSON):

    python -m fedmm.simulations.benchmarks.secagg_benchmark --sites 10 \\
        --lengths 100000 --flower-legacy
    python -m fedmm.simulations.benchmarks.secagg_benchmark --sites 10 50 100 \
        --lengths 100000 1000000 --repeats 3 --flower-legacy
    python -m fedmm.simulations.benchmarks.secagg_benchmark --sites 10 50 --lengths 100000 --active
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from fedmm.client import secure_aggregation as site
from fedmm.common.secure_round import (
    ACTION_CONSISTENCY,
    ACTION_MASKED,
    ACTION_SETUP,
    ACTION_SETUP_SHARE,
    ACTION_SHARE,
    ACTION_UNMASK,
    METRIC_EPSILON_BOUND,
    METRIC_NUM_EXAMPLES,
    METRIC_STEPS,
)
from fedmm.common.site_task import RECORD_ARRAYS, RECORD_CONFIG, RECORD_METRICS, RECORD_UPDATE

PLAN_ENV = "FEDMM_SECAGG_BENCH_PLAN"


def _note_peak_memory() -> None:
    """Record this process's peak RSS (the Ray actor's) for the benchmark's report."""
    directory = json.loads(os.environ[PLAN_ENV])["memory_dir"]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(directory, f"rss-{os.getpid()}").write_text(str(peak_kb))


def _random_update(length: int, context: Context, server_round: int) -> np.ndarray:
    rng = np.random.default_rng([int(context.node_id) % 2**32, server_round])
    return rng.normal(0.0, 0.01, length)


def plain_train(msg: Message, context: Context) -> Message:
    _note_peak_memory()
    arrays = msg.content.array_records[RECORD_ARRAYS]
    length = sum(math.prod(a.shape) for a in arrays.values())
    server_round = int(msg.content.config_records[RECORD_CONFIG]["server_round"])
    update = _random_update(length, context, server_round).astype(np.float32)
    metrics = {METRIC_NUM_EXAMPLES: 100, METRIC_STEPS: 1, METRIC_EPSILON_BOUND: 1.0}
    content = RecordDict(
        {
            RECORD_UPDATE: ArrayRecord({"model": Array(update)}),
            RECORD_METRICS: MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)


def _dummy_contribution(msg: Message, context: Context) -> site.SiteContribution:
    length = sum(math.prod(a.shape) for a in msg.content.array_records[RECORD_ARRAYS].values())
    server_round = int(msg.content.config_records[RECORD_CONFIG]["server_round"])
    return site.SiteContribution(
        vector=_random_update(length, context, server_round),
        weight=100,
        metrics={METRIC_STEPS: 1},
        epsilon_bound=1.0,
    )


def setup(msg: Message, context: Context) -> Message:
    _note_peak_memory()
    return site.run_secagg_setup(msg, context, contribute=_dummy_contribution, integer_vector=False)


def setup_share(msg: Message, context: Context) -> Message:
    _note_peak_memory()
    return site.run_secagg_setup_share(
        msg, context, contribute=_dummy_contribution, integer_vector=False
    )


def benchmark_client_app(*, mods: Sequence[Mod] = ()) -> ClientApp:
    """The project's SecAgg+ stage handlers, with a random update instead of training."""
    client_app = ClientApp(mods=list(mods))
    client_app.train()(plain_train)
    client_app.train(ACTION_SETUP)(setup)
    client_app.train(ACTION_SETUP_SHARE)(setup_share)
    client_app.train(ACTION_SHARE)(site.secagg_share)
    client_app.train(ACTION_MASKED)(site.secagg_masked)
    client_app.train(ACTION_CONSISTENCY)(site.secagg_consistency)
    client_app.train(ACTION_UNMASK)(site.secagg_unmask)
    return client_app


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

    def _count(self, messages: list[Message], *, sent: bool) -> None:
        started = time.perf_counter()
        size = sum(recorddict_to_proto(m.content).ByteSize() for m in messages if not m.has_error())
        if sent:
            self.sent += size
        else:
            self.received += size
        self.counting_s += time.perf_counter() - started

    def push_messages(self, messages):
        messages = list(messages)
        self._count(messages, sent=True)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self._count(replies, sent=False)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self._count(messages, sent=True)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self._count(replies, sent=False)
        return replies


class FastPollingGrid:
    """FedAvg's single exchange with SecAgg+'s reply polling (``poll_replies``), so the
    two can also be compared with the same polling."""

    def __init__(self, grid: CountingGrid) -> None:
        self.grid = grid

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from fedmm.server.reply_polling import PROTOCOL_POLL, poll_replies

        grid: Any = self.grid
        return poll_replies(grid, list(messages), timeout=timeout or 600.0, schedule=PROTOCOL_POLL)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmm.common.federation_config import FederationConfig
    from fedmm.common.secure_round import metric_ranges
    from fedmm.common.site_task import SiteTask, task_config
    from fedmm.common.train_request import TrainRequest
    from fedmm.server.aggregation import FedAvgAggregation, RoundRequest, wait_for_sites
    from fedmm.server.secure_aggregation import (
        SecAggPlusAggregation,
        SecAggSettings,
        load_federation_roster,
    )

    plan = json.loads(os.environ[PLAN_ENV])
    num_sites = plan["sites"]
    nodes = wait_for_sites(grid, num_sites, timeout=120.0, setting="--sites")[:num_sites]
    counting = CountingGrid(grid)
    fast_polling = FastPollingGrid(counting)
    four = SecAggSettings(update_clip=1.0, max_weight=1000, advertise_next_keys=False)
    kinds = {
        "fedavg": (FedAvgAggregation(), counting),
        "fedavg_fast_poll": (FedAvgAggregation(), fast_polling),
        "secagg+": (SecAggPlusAggregation(four), counting),
        "secagg+3": (
            SecAggPlusAggregation(dataclasses.replace(four, advertise_next_keys=True)),
            counting,
        ),
    }
    if plan.get("active"):
        roster = load_federation_roster(str(context.run_config["secagg-roster-file"]))
        kinds["secagg+active"] = (
            SecAggPlusAggregation(dataclasses.replace(four, roster=roster)),
            counting,
        )
    secagg = kinds["secagg+"][0]
    secagg3 = kinds["secagg+3"][0]
    assert isinstance(secagg, SecAggPlusAggregation) and isinstance(secagg3, SecAggPlusAggregation)
    results = []
    server_round = 0
    for length in plan["lengths"]:
        model = ArrayRecord({"model": Array(np.zeros(length, dtype=np.float32))})
        timings: dict[str, list[float]] = {kind: [] for kind in kinds}
        exchanges: dict[str, list[float]] = {}
        exchanges3: dict[str, list[float]] = {}
        active_exchanges: dict[str, list[float]] = {}
        traffic: dict[str, tuple[int, int]] = {}
        for repeat in range(plan["repeats"] + 1):  # the first of each kind warms up
            for kind, (aggregation, kind_grid) in kinds.items():
                server_round += 1
                request = TrainRequest.for_round(FederationConfig(), server_round).to_config()
                config = ConfigRecord(task_config(SiteTask.LOCAL_DP_SGD, request))
                counting.reset()
                started = time.perf_counter()
                round_request = RoundRequest(
                    round_id=server_round,
                    content=RecordDict({RECORD_ARRAYS: model, RECORD_CONFIG: config}),
                    shapes=[("model", (length,))],
                    metric_ranges=metric_ranges(max_weight=1000, max_steps=1),
                    timeout=600.0,
                    # This kind's next round, for which the secagg+3 sites advertise keys.
                    next_round_id=server_round + len(kinds),
                )
                aggregate = aggregation.run_round(
                    kind_grid,  # type: ignore[arg-type]
                    round_request,
                    node_ids=nodes,
                )
                elapsed = time.perf_counter() - started - counting.counting_s
                if aggregate.aborted or aggregate.count("trained") != num_sites:
                    raise RuntimeError(f"{kind} round failed: {aggregate.aborted}")
                if repeat > 0:
                    timings[kind].append(elapsed)
                    if kind == "secagg+":
                        for name, seconds in secagg.last_round.exchange_seconds.items():
                            exchanges.setdefault(name, []).append(seconds)
                        # What the coordinator spends outside the four exchanges (its stages).
                        outside = elapsed + counting.counting_s
                        outside -= sum(secagg.last_round.exchange_seconds.values())
                        exchanges.setdefault("coordinator_stages", []).append(outside)
                    if kind == "secagg+3":
                        if len(secagg3.last_round.exchange_seconds) != 3:
                            raise RuntimeError("a timed secagg+3 round did not run 3 exchanges")
                        for name, seconds in secagg3.last_round.exchange_seconds.items():
                            exchanges3.setdefault(name, []).append(seconds)
                        outside = elapsed + counting.counting_s
                        outside -= sum(secagg3.last_round.exchange_seconds.values())
                        exchanges3.setdefault("coordinator_stages", []).append(outside)
                    if kind == "secagg+active":
                        active = kinds[kind][0]
                        assert isinstance(active, SecAggPlusAggregation)
                        for name, seconds in active.last_round.exchange_seconds.items():
                            active_exchanges.setdefault(name, []).append(seconds)
                traffic[kind] = (counting.sent // num_sites, counting.received // num_sites)
        median = {kind: statistics.median(times) for kind, times in timings.items()}
        exchange_s = {name: statistics.median(times) for name, times in exchanges.items()}
        results.append(
            {
                "sites": num_sites,
                "length": length,
                "fedavg_round_s": round(median["fedavg"], 3),
                "fedavg_fast_poll_round_s": round(median["fedavg_fast_poll"], 3),
                "secagg_round_s": round(median["secagg+"], 3),
                "time_ratio": round(median["secagg+"] / median["fedavg"], 2),
                "time_ratio_vs_fedavg_fast_poll": round(
                    median["secagg+"] / median["fedavg_fast_poll"], 2
                ),
                "fedavg_bytes_per_site": {"down": traffic["fedavg"][0], "up": traffic["fedavg"][1]},
                "secagg_bytes_per_site": {
                    "down": traffic["secagg+"][0],
                    "up": traffic["secagg+"][1],
                },
                "bytes_ratio": round(sum(traffic["secagg+"]) / sum(traffic["fedavg"]), 3),
                "secagg_extra_bytes_per_site": sum(traffic["secagg+"]) - sum(traffic["fedavg"]),
                "secagg_parts_s_median": {k: round(v, 3) for k, v in exchange_s.items()},
                "secagg3_round_s": round(median["secagg+3"], 3),
                "secagg3_time_ratio": round(median["secagg+3"] / median["fedavg"], 2),
                "secagg3_time_ratio_vs_fedavg_fast_poll": round(
                    median["secagg+3"] / median["fedavg_fast_poll"], 2
                ),
                "secagg3_vs_secagg4_time_ratio": round(median["secagg+3"] / median["secagg+"], 3),
                "secagg3_saved_s": round(median["secagg+"] - median["secagg+3"], 3),
                "secagg3_bytes_per_site": {
                    "down": traffic["secagg+3"][0],
                    "up": traffic["secagg+3"][1],
                },
                "secagg3_parts_s_median": {
                    name: round(statistics.median(times), 3) for name, times in exchanges3.items()
                },
                "secagg_degree": secagg.last_round.degree,
                "secagg_threshold": secagg.last_round.threshold,
                "repeats": plan["repeats"],
            }
        )
        if "secagg+active" in kinds:
            active = kinds["secagg+active"][0]
            assert isinstance(active, SecAggPlusAggregation)
            up, down = traffic["secagg+active"][1], traffic["secagg+active"][0]
            passive = sum(traffic["secagg+"])
            results[-1] |= {
                "secagg_active_round_s": round(median["secagg+active"], 3),
                "active_time_ratio": round(median["secagg+active"] / median["secagg+"], 3),
                "active_added_s": round(median["secagg+active"] - median["secagg+"], 3),
                "active_exchanges": len(active.last_round.exchange_seconds),
                "secagg_exchanges": len(secagg.last_round.exchange_seconds),
                "secagg_active_bytes_per_site": {"down": down, "up": up},
                "active_bytes_ratio": round((up + down) / passive, 3),
                "active_extra_bytes_per_site": up + down - passive,
                "secagg_active_parts_s_median": {
                    name: round(statistics.median(times), 3)
                    for name, times in active_exchanges.items()
                },
                "secagg_active_degree": active.last_round.degree,
                "secagg_active_threshold": active.last_round.threshold,
            }
    Path(plan["out"]).write_text(json.dumps(results))


# --- Flower's legacy SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), for comparison ----------


def _legacy_client_fn(context: Context):
    from flwr.client import NumPyClient

    class RandomUpdateClient(NumPyClient):
        def fit(self, parameters, config):
            _note_peak_memory()
            length = parameters[0].size
            update = _random_update(length, context, int(config.get("server_round", 0)))
            return [update.astype(np.float32)], 100, {}

    return RandomUpdateClient().to_client()


def _legacy_client_app(*, mods: Sequence[Mod] = ()) -> ClientApp:
    from flwr.client.mod import secaggplus_mod

    return ClientApp(client_fn=_legacy_client_fn, mods=[*mods, secaggplus_mod])


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

    from fedmm.common.secagg.neighbour_graph import default_graph_parameters
    from fedmm.server.aggregation import wait_for_sites

    plan = json.loads(os.environ[PLAN_ENV])
    num_sites = plan["sites"]
    wait_for_sites(grid, num_sites, timeout=120.0, setting="--sites")
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


def run_flower_legacy(
    num_sites: int, lengths: list[int], repeats: int, *, actors: int = 1
) -> list[dict]:
    """Flower's own SecAgg+ on the legacy API, in its own simulation."""
    return _simulate(
        num_sites, lengths, repeats, _legacy_client_app, legacy_server_app, actors=actors
    )


def run(
    num_sites: int, lengths: list[int], repeats: int, *, actors: int = 1, active: bool = False
) -> list[dict]:
    """This project's SecAgg+ (and, with ``active``, in active-coordinator mode) and plain
    FedAvg, alternating, in one simulation."""
    return _simulate(
        num_sites, lengths, repeats, benchmark_client_app, server_app, actors=actors, active=active
    )


def _simulate(
    num_sites: int,
    lengths: list[int],
    repeats: int,
    clients: Any,
    server: ServerApp,
    *,
    actors: int,
    active: bool = False,
) -> list[dict]:
    """One simulation of ``server`` with the sites' ClientApp ``clients(mods=...)``;
    ``active``: the simulation makes a roster and the sites pin it."""
    from fedmm.common.federation_config import FederationConfig
    from fedmm.simulations.local_simulation import SimulationSettings, run_local_simulation

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "results.json"
        memory = Path(scratch) / "memory"
        memory.mkdir()
        os.environ[PLAN_ENV] = json.dumps(
            {
                "sites": num_sites,
                "lengths": lengths,
                "repeats": repeats,
                "out": str(out),
                "memory_dir": str(memory),
                "active": active,
            }
        )
        config = FederationConfig.from_run_config(
            {"out-dir": str(Path(scratch) / "run"), "secagg-active-coordinator": active}
        )
        run_local_simulation(
            config,
            # Ray runs 2 CPUs / num_cpus_per_site actors; each simulation gets its own spill
            # root (a later one must not inherit a removed one).
            SimulationSettings(
                num_sites=num_sites,
                num_cpus_per_site=max(1, 2 // actors),
                secagg_spill_dir=scratch,
                sites_require_active_coordinator=False,
            ),
            client_app=clients,
            server_app=server,
        )
        rows = json.loads(out.read_text())
        actor_kb = max((int(path.read_text()) for path in memory.iterdir()), default=0)
        driver_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for row in rows:
            row["peak_rss_mb"] = {"actor": actor_kb // 1024, "driver_so_far": driver_kb // 1024}
            print(f"progress: {json.dumps(row)}", file=sys.stderr, flush=True)
        return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--actors",
        type=int,
        choices=[1, 2],
        default=1,
        help="Ray actors for the sites (1: the project's simulation default on 2 cores)",
    )
    parser.add_argument(
        "--flower-legacy", action="store_true", help="also run Flower's legacy SecAgg+"
    )
    parser.add_argument(
        "--active",
        action="store_true",
        help="also run SecAgg+ in active-coordinator mode (signed keys, consistency check)",
    )
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    started = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    rows = [
        row
        for n in args.sites
        for row in run(n, args.lengths, args.repeats, actors=args.actors, active=args.active)
    ]
    if args.flower_legacy:
        for n in args.sites:
            try:
                legacy_rows = run_flower_legacy(n, args.lengths, args.repeats, actors=args.actors)
            except Exception as error:  # report it with the rest rather than lose the run
                for row in rows:
                    if row["sites"] == n:
                        row["flower_legacy"] = {"error": f"{type(error).__name__}: {error}"}
                continue
            for legacy in legacy_rows:
                row = next(r for r in rows if (r["sites"], r["length"]) == (n, legacy["length"]))
                row["flower_legacy"] = legacy
                row["secagg_vs_flower_legacy_time_ratio"] = round(
                    row["secagg_round_s"] / legacy["flower_secaggplus_round_s"], 2
                )
                row["secagg3_vs_flower_legacy_time_ratio"] = round(
                    row["secagg3_round_s"] / legacy["flower_secaggplus_round_s"], 2
                )
    print(
        json.dumps(
            {
                "benchmark": "secagg+ vs fedavg, Flower simulation runtime (Ray)",
                "actors": args.actors,
                "cpu_count": os.cpu_count(),
                "load_average_at_start": load_at_start,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "results": rows,
                "fixed_cost_10_sites_100k": next(
                    (
                        {
                            "secagg_round_s": r["secagg_round_s"],
                            "secagg3_round_s": r["secagg3_round_s"],
                            "fedavg_round_s": r["fedavg_round_s"],
                            "overhead_s": round(r["secagg_round_s"] - r["fedavg_round_s"], 3),
                            "overhead3_s": round(r["secagg3_round_s"] - r["fedavg_round_s"], 3),
                            "parts_s": r["secagg_parts_s_median"],
                            "parts3_s": r["secagg3_parts_s_median"],
                        }
                        for r in rows
                        if r["sites"] == 10 and r["length"] == 100_000
                    ),
                    None,
                ),
                "active_coordinator": [
                    {
                        key: r[key]
                        for key in (
                            "sites",
                            "length",
                            "secagg_round_s",
                            "secagg_active_round_s",
                            "active_time_ratio",
                            "active_added_s",
                            "secagg_exchanges",
                            "active_exchanges",
                            "secagg_bytes_per_site",
                            "secagg_active_bytes_per_site",
                            "active_bytes_ratio",
                            "secagg_degree",
                            "secagg_active_degree",
                        )
                    }
                    for r in rows
                    if "secagg_active_round_s" in r
                ],
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
