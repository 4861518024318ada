"""The ``fedmm`` command line: one entry point for every command.

``fedmm simulate`` and ``fedmm privacy-sweep`` are this package's (simulation and
experiments); the coordinator's commands (``fedmm coordinator ...``) are
``server.coordinator_commands``, a site's (``fedmm site ...``, ``fedmm deidentify``) are
``client.site_commands`` and ``client.deidentify_command``. This module only assembles their
parsers: it is the one place that sees both sides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmm.client.deidentify_command import add_deidentify_parser, run_deidentify
from fedmm.client.site_commands import add_site_parser
from fedmm.common.cli_arguments import epsilon, key_value_pairs, run_step
from fedmm.common.data.partitioning import PARTITION_SCHEMES
from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.server.coordinator_commands import add_coordinator_parser
from fedmm.simulations.run_log import RUN_LOG, log_tail, terminal_to_log

RUN_CONFIG_FILE = "run-config.json"
#: Run config a --site-data run starts from unless --set says otherwise: the measured
#: real-data recipe's geometry and tokenizer (docs/real-data.md), colour at 64x64.
REAL_DATA_DEFAULTS = {
    "image-size": "64x64",
    "image-channels": 3,
    "model-patch-size": 8,
    "model-vocab-buckets": 4096,
    "model-caption-words": 24,
    "distractor-word-lists": "colours,positions,counts,sizes",
}
#: The built-in benchmark's defaults: the coordinator measures the model on Fashion-MNIST's
#: public test split, so the sites hold out 5% of their records (270 each) for the federated
#: evaluation's cross-check, not 20%: at epsilon 3, training on 4,320 records instead of 5,400
#: cost the default run about 3 points (docs/results.md).
BENCHMARK_DEFAULTS = {"eval-fraction": 0.05}
#: The built-in benchmark's model unless --set names an encoder: Tramer and Boneh's
#: "ScatterNet + linear" readout (the ``scatter-linear`` encoder: fixed scattering features,
#: GroupNorm'd, mapped linearly to one image token), no caption block (as accurate under DP
#: and cheaper), with the clip and learning rate it was measured with (docs/results.md, "The
#: default local-DP run").
BENCHMARK_MODEL = {
    "model-image-encoder": "scatter-linear",
    "model-image-layers": 0,
    "model-text-layers": 0,
    "max-grad-norm": 0.1,
    "learning-rate": 16.0,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate",
        help="run a local federated simulation (Flower simulation runtime)",
        description="Federated DP-SGD training of the cross-attention image-text model on "
        "the built-in Fashion-MNIST benchmark, with simulated sites.",
    )
    sim.add_argument("--rounds", type=int, help="server rounds (default 14)")
    sim.add_argument(
        "--sites",
        type=int,
        help="number of simulated sites (10; with one --site-data folder: split it into N)",
    )
    sim.add_argument(
        "--site-data",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="your own imagefolders (metadata.jsonl + images, docs/real-data.md): one "
        "simulated site each, or one folder split into --sites by --partition",
    )
    sim.add_argument("--epsilon", type=epsilon, help="target epsilon per site; inf = DP off (3)")
    sim.add_argument("--partition", choices=PARTITION_SCHEMES, help="iid or dirichlet (iid)")
    sim.add_argument("--dirichlet-alpha", type=float, help="Dirichlet concentration (0.3)")
    sim.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX .gz files")
    sim.add_argument("--out", type=Path, help="output folder (default runs/<id>)")
    sim.add_argument("--resume", action="store_true", help="continue the run in --out")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run config key of pyproject.toml, e.g. --set batch-size=512",
    )
    sim.add_argument("--site-max-epsilon", type=epsilon, help="simulated sites' own budget")
    sim.add_argument(
        "--dp",
        choices=("local", "distributed"),
        help="local: DP-SGD at each site (default); distributed: one DP-SGD step per round "
        "on the union of the sites' data, Skellam noise shares under SecAgg+ (run config "
        "dp-mode; see docs/distributed-dp.md)",
    )
    sim.add_argument(
        "--cpus-per-site",
        type=int,
        default=1,
        help="Ray CPUs per site actor; 1 on 2 cores runs two sites at once",
    )
    sim.add_argument(
        "--ray-address",
        default="",
        metavar="HOST:PORT",
        help="run the sites on an existing Ray cluster (started with `ray start --head`); "
        "every node needs fedmm installed and the output folder and data at the same paths",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar or round lines")
    sim.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's and site's log output on the terminal (by default it goes "
        "to run.log in the output folder)",
    )
    digest = commands.add_parser(
        "weights-digest",
        help="print the SHA-256 that pins a frozen encoder's weights (a file, a directory or "
        "a hub name)",
        description="The value of run config model-image-weights-sha256 / "
        "model-text-weights-sha256 for a local weights file, a hub snapshot directory, or a "
        "hub name hf-hub:<org>/<name>[@<revision>] (resolved into the Hugging Face cache).",
    )
    digest.add_argument("path")
    random_encoders = commands.add_parser(
        "random-encoders",
        help="write small randomly initialised OpenCLIP, timm and BERT checkpoints (a dry run "
        "of pretrained encoders without hub access) and print their run config",
    )
    random_encoders.add_argument("out", type=Path)
    add_deidentify_parser(commands)
    add_coordinator_parser(commands)
    add_site_parser(commands)
    from fedmm.simulations.privacy.sweep_command import add_privacy_sweep_parser

    add_privacy_sweep_parser(commands)
    return parser


def _simulation_config(args: argparse.Namespace) -> tuple[FederationConfig, Path]:
    overrides: dict[str, Any] = key_value_pairs(args.set, option="--set")
    for key, value in (
        ("num-server-rounds", args.rounds),
        ("epsilon", args.epsilon),
        ("partition", args.partition),
        ("dirichlet-alpha", args.dirichlet_alpha),
        ("data-dir", args.data_dir),
        ("dp-mode", args.dp),
    ):
        if value is not None:
            overrides[key] = value
    if args.resume:
        if args.out is None or not (args.out / RUN_CONFIG_FILE).exists():
            raise ConfigError("--resume needs --out naming an earlier run's folder")
        saved = json.loads((args.out / RUN_CONFIG_FILE).read_text())
        return FederationConfig.from_run_config({**saved, **overrides, "resume": True}), args.out
    out = args.out or Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run: pass --resume, or choose another --out")
    defaults = REAL_DATA_DEFAULTS if args.site_data else _benchmark_defaults(overrides)
    overrides = {**defaults, **overrides}
    sites = _num_sites(args)
    overrides.setdefault("min-available-sites", sites)
    overrides.setdefault("min-train-sites", min(2, sites))
    config = FederationConfig.from_run_config({**overrides, "out-dir": str(out.resolve())})
    return config, out


def _benchmark_defaults(overrides: dict[str, object]) -> dict[str, object]:
    """The benchmark's defaults; its model's only when the run names no encoder (an encoder
    of the user's own keeps the run config's clip and learning rate, not the readout's)."""
    named = {"model-image-encoder", "model-text-encoder"} & set(overrides)
    return BENCHMARK_DEFAULTS if named else {**BENCHMARK_DEFAULTS, **BENCHMARK_MODEL}


def _num_sites(args: argparse.Namespace) -> int:
    """The simulated sites: --sites, else one per --site-data folder when there are
    several, else 10."""
    if args.sites is not None:
        return int(args.sites)
    if args.site_data and len(args.site_data) > 1:
        return len(args.site_data)
    return 10


def _site_folders(args: argparse.Namespace, config: FederationConfig, out: Path) -> list[Path]:
    """The simulated sites' imagefolders (none: the benchmark): --site-data, or on --resume
    the folders the run started with."""
    from fedmm.simulations.site_folders import recorded_site_folders, simulated_site_folders

    if args.site_data:
        return simulated_site_folders(
            args.site_data,
            out,
            num_sites=args.sites,
            scheme=config.partition,
            alpha=config.dirichlet_alpha,
            seed=config.seed,
        )
    if args.resume:
        return recorded_site_folders(out) or []
    return []


def round_line(row: dict[str, Any], total: int) -> str:
    """One terminal line for a finished round of ``metrics.jsonl``."""
    parts = [f"round {row.get('round', '?')}/{total}"]
    if "accuracy" in row:
        parts.append(f"accuracy {float(row['accuracy']):.3f}")
    if "r_at_1_i2t" in row and "r_at_1_t2i" in row:
        parts.append(f"R@1 i2t {float(row['r_at_1_i2t']):.3f} t2i {float(row['r_at_1_t2i']):.3f}")
    federated = row.get("federated_eval") or {}
    if "r_at_10_i2t" in federated:
        parts.append(
            f"sites' R@10 i2t {float(federated['r_at_10_i2t']):.3f} "
            f"(chance {float(federated['chance_r_at_10']):.3f})"
        )
    for key in sorted(k for k in row if k.startswith("epsilon")):
        parts.append(f"{key} {row[key]}")
    parts.append(
        f"sites trained {row.get('sites_trained', 0)} refused {row.get('sites_refused', 0)} "
        f"failed {row.get('sites_failed', 0)}"
    )
    if "wall_s" in row:
        parts.append(f"{float(row['wall_s']):.1f} s")
    line = ", ".join(parts)
    return f"{line} (model unchanged: {row['aborted']})" if row.get("aborted") else line


def _watch_progress(out: Path, total: int, stop: threading.Event, terminal: Any) -> None:
    """A progress bar and one line per finished round, on ``terminal``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedmm.server.run_report import read_metrics

    shown = 0
    with Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(file=terminal),
    ) as progress:
        task = progress.add_task("", total=total)
        while True:
            finished = stop.is_set()
            rows = read_metrics(out)
            for row in rows[shown:]:
                progress.console.print(round_line(row, total), highlight=False, soft_wrap=True)
            shown = len(rows)
            progress.update(task, completed=shown)
            if finished:
                break
            stop.wait(1.0)


def _print_summary(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = json.loads((out / "summary.json").read_text())
    final = summary.get("final", {})
    table = Table(title=f"fedmm simulate: {out}")
    table.add_column("metric")
    table.add_column("value")
    for key in (
        "round",
        "accuracy",
        "r_at_1_i2t",
        "r_at_1_t2i",
        "r_at_5_i2t",
        "r_at_5_t2i",
        "eval_loss",
        "epsilon_bound_max",
        "sites_trained",
        "sites_refused",
    ):
        if key in final:
            table.add_row(key, str(final[key]))
    federated = summary.get("federated_eval") or {}
    for key in ("records", "r_at_10_i2t", "r_at_10_t2i", "chance_r_at_10", "r_at_10_i2t_shuffled"):
        if key in federated:
            table.add_row(f"sites' held-out {key}", str(federated[key]))
    sites = summary.get("site_epsilons", {})
    if sites:  # the exact spend, read from the simulated sites' ledgers
        worst = max(sites.values(), key=lambda entry: float(entry["epsilon"]))
        exact = f"{float(worst['epsilon']):.4f} at delta {worst['delta']:g}"
        table.add_row("site epsilon (max, exact)", exact)
    table.add_row("wall time (s)", f"{summary['wall_s_total']:.0f}")
    table.add_row("privacy", summary["privacy"])
    Console().print(table)


def simulate(args: argparse.Namespace) -> int:
    from fedmm.simulations.local_simulation import SimulationSettings, run_local_simulation

    config, out = _simulation_config(args)
    if args.ray_address:
        from fedmm.simulations.ray_cluster import check_ray_address

        check_ray_address(args.ray_address)
    out.mkdir(parents=True, exist_ok=True)
    folders = _site_folders(args, config, out)
    num_sites = len(folders) if folders else _num_sites(args)
    (out / RUN_CONFIG_FILE).write_text(
        json.dumps({**config.to_run_config(), "resume": False}, indent=2)
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log_path = out / RUN_LOG
    started = time.monotonic()
    with terminal_to_log(log_path, verbose=args.verbose) as terminal:
        stop = threading.Event()
        watcher = None
        if not args.quiet:
            watcher = threading.Thread(
                target=_watch_progress,
                args=(out, config.num_server_rounds, stop, terminal),
                daemon=True,
            )
            watcher.start()
        try:
            run_local_simulation(
                config,
                SimulationSettings(
                    num_sites=num_sites,
                    site_data=tuple(str(folder) for folder in folders),
                    site_max_epsilon=args.site_max_epsilon,
                    num_cpus_per_site=args.cpus_per_site,
                    ray_address=args.ray_address,
                ),
            )
        except BaseException:
            logging.getLogger(__name__).exception("the simulation failed")
            raise
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(timeout=10)
    if not (out / "summary.json").exists():
        tail = "" if args.verbose else log_tail(log_path)
        print(
            f"the run did not finish; outputs so far are in {out}"
            + (f"; the end of {log_path}:\n{tail}" if tail else ""),
            file=sys.stderr,
        )
        return 1
    _print_summary(out)
    where = "" if args.verbose else f"; log in {log_path}"
    print(f"outputs in {out} ({time.monotonic() - started:.0f} s{where})")
    return 0


def print_weights_digest(weights: str) -> int:
    """Print the SHA-256 pin of ``weights`` (a path or a hub name); 2 with the reason when
    they cannot be read."""
    from fedmm.common.pretrained.encoder_spec import FrozenWeightsError, weights_digest
    from fedmm.common.pretrained.hub_weights import resolve_hub_weights

    try:
        print(weights_digest(resolve_hub_weights(weights)))
    except FrozenWeightsError as err:
        print(f"fedmm: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return simulate(args)
        if args.command == "deidentify":
            return run_deidentify(args)
        if args.command == "weights-digest":
            return print_weights_digest(args.path)
        if args.command == "random-encoders":
            from fedmm.simulations.random_encoders import write_small_encoders

            print(json.dumps(write_small_encoders(args.out), indent=2))
            return 0
        if args.command in ("coordinator", "site"):  # the deployment steps of either side
            return run_step(args, command=args.command)
        if args.command == "privacy-sweep":
            from fedmm.simulations.privacy.sweep_command import run_privacy_sweep

            return run_privacy_sweep(args)
    except ConfigError as err:
        print(f"fedmm: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
