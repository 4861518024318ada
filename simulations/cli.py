"""The ``fedmm`` command line."""

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

from common.cli_arguments import epsilon, key_value_pairs
from common.federation_config import PARTITION_SCHEMES, ConfigError, FederationConfig
from simulations.run_log import RUN_LOG, log_tail, terminal_to_log

RUN_CONFIG_FILE = "run-config.json"


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
    sim.add_argument("--sites", type=int, default=10, help="number of simulated sites (10)")
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
    sim.add_argument("--quiet", action="store_true", help="no progress bar or round lines")
    sim.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's and site's log output on the terminal (by default it goes "
        "to run.log in the output folder)",
    )
    deid = commands.add_parser(
        "deidentify",
        help="de-identify an imagefolder dataset (faces, personal data in captions)",
        description="Copy the imagefolder dataset SRC to DST with faces anonymised, image "
        "metadata dropped and personal data in metadata.jsonl replaced by keyed pseudonyms "
        "or redaction tokens, under the site's policy; writes DST/audit.json (counts only, "
        "never a value found). Running it again gives the same bytes. See "
        "docs/deidentification.md.",
    )
    deid.add_argument("src", type=Path, metavar="SRC", help="the imagefolder dataset to read")
    deid.add_argument(
        "dst",
        type=Path,
        metavar="DST",
        help="where to write it: a new or empty folder, or an earlier output of this command",
    )
    deid.add_argument("--policy", type=Path, help="the site's policy, .toml or .json (defaults)")
    deid.add_argument(
        "--secret",
        type=Path,
        help="the site secret file, created (0600) on first use "
        "(default $XDG_CONFIG_HOME/fedmm/site-secret, i.e. ~/.config/fedmm/site-secret)",
    )
    deid.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _add_coordinator_commands(commands)
    _add_site_commands(commands)
    from simulations.privacy.sweep_command import add_privacy_sweep_parser

    add_privacy_sweep_parser(commands)
    return parser


def _add_coordinator_commands(commands: Any) -> None:
    coord = commands.add_parser(
        "coordinator",
        help="coordinator deployment: CA, SuperLink certificate, SuperLink, site registration",
        description="Deployment steps of the coordinator (docs/operator-guide.md).",
    )
    steps = coord.add_subparsers(dest="step", required=True)
    init_ca = steps.add_parser("init-ca", help="create the CA (DIR/ca.key 0600, DIR/ca.crt)")
    init_ca.add_argument("dir", type=Path, metavar="DIR")
    issue = steps.add_parser(
        "issue-cert", help="issue the SuperLink's TLS certificate (DIR/superlink.key, .crt)"
    )
    issue.add_argument("dir", type=Path, metavar="DIR", help="the CA's folder")
    issue.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="an IP address or DNS name sites use to reach the SuperLink (repeat)",
    )
    issue.add_argument("--days", type=int, default=397, help="validity in days (397)")
    issue.add_argument(
        "--no-loopback", action="store_true", help="do not add 127.0.0.1 and localhost"
    )
    start = steps.add_parser(
        "start-superlink",
        help="run flower-superlink (TLS, SuperNode authentication) behind a Fleet-only proxy",
        description="Run the SuperLink on loopback (--address: its Control API, for flwr on "
        "this machine) and nginx on --public-address, which forwards only the Fleet API to "
        "it; restart either after a crash, stopping what it left running.",
    )
    start.add_argument("dir", type=Path, metavar="DIR", help="the CA's folder")
    start.add_argument(
        "--address",
        required=True,
        metavar="HOST:PORT",
        help="the SuperLink's own address, on loopback (e.g. 127.0.0.1:9092)",
    )
    start.add_argument(
        "--public-address",
        metavar="HOST:PORT",
        help="where sites connect (e.g. 0.0.0.0:9093): TLS, Fleet API only",
    )
    start.add_argument(
        "--expose-control-api",
        action="store_true",
        help="allow a non-loopback --address (anyone reaching it can submit runs)",
    )
    start.add_argument("--database", type=Path, help="state file (DIR/superlink-state.db)")
    start.add_argument("--log-file", type=Path, help="also log to this file")
    start.add_argument("--dry-run", action="store_true", help="print the command only")
    conn = steps.add_parser(
        "add-connection",
        help="name the SuperLink in $FLWR_HOME/config.toml for the flwr CLI",
    )
    conn.add_argument("name", metavar="NAME")
    conn.add_argument("--address", required=True, metavar="HOST:PORT")
    conn.add_argument("--ca-cert", required=True, type=Path, metavar="FILE")
    register = steps.add_parser(
        "register-site", help="register a site's public key (flwr supernode register)"
    )
    register.add_argument("public_key", type=Path, metavar="PUBKEY")
    register.add_argument("--connection", required=True, metavar="NAME")
    register.add_argument("--name", help="a label for the site")
    submit = steps.add_parser(
        "submit",
        help="submit a run (flwr run) with its outputs in --out-dir; --resume continues it",
        description="Submit a training run to the SuperLink named by --connection, from the "
        "coordinator machine. Outputs (metrics, checkpoints, final model, report) go to "
        "--out-dir; after the coordinator stopped mid-run, --resume with the same --out-dir "
        "continues from the last checkpoint.",
    )
    submit.add_argument("--connection", required=True, metavar="NAME", help="see add-connection")
    submit.add_argument(
        "--out-dir", required=True, type=Path, metavar="DIR", help="new or empty (or --resume)"
    )
    submit.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir (last checkpoint)"
    )
    submit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run config key of pyproject.toml, e.g. --set num-server-rounds=10 (repeat)",
    )
    submit.add_argument("--app", type=Path, metavar="DIR", help="the app (this checkout)")
    submit.add_argument(
        "--detach", action="store_true", help="return once the run started (no log stream)"
    )
    submit.add_argument("--dry-run", action="store_true", help="check and print the command only")


def _add_site_commands(commands: Any) -> None:
    site = commands.add_parser(
        "site",
        help="site deployment: key pair, config check, SuperNode, privacy ledger",
        description="Deployment steps of a data-holding site (docs/site-guide.md).",
    )
    steps = site.add_subparsers(dest="step", required=True)
    keygen = steps.add_parser(
        "keygen", help="create DIR/site-auth-key (0600) and DIR/site-auth-key.pub"
    )
    keygen.add_argument("dir", type=Path, metavar="DIR")
    keygen.add_argument("--comment", default="fedmm-site", help="comment in the .pub file")
    check = steps.add_parser("check", help="check a site config and every file it names")
    check.add_argument("config", type=Path, metavar="CONFIG")
    digest = steps.add_parser(
        "release-digest",
        help="the digest of the installed fedmm release, for [release] in the site config",
        description="SHA-256 of the FAB that `flwr run` builds from the release (the same "
        "value the coordinator submits and `flwr build` names).",
    )
    digest.add_argument("--app", type=Path, metavar="DIR", help="another release checkout")
    digest.add_argument("--files", action="store_true", help="list the files it covers")
    start = steps.add_parser(
        "start",
        help="check the config, then run the SuperNode and the site's own ClientApp runner",
    )
    start.add_argument("config", type=Path, metavar="CONFIG")
    start.add_argument("--superlink", required=True, metavar="HOST:PORT")
    start.add_argument("--ca-cert", required=True, type=Path, metavar="FILE")
    start.add_argument(
        "--port", required=True, type=int, help="this SuperNode's own local Runtime API port"
    )
    start.add_argument(
        "--max-wait-time",
        type=float,
        help="give up connecting, and restarting a refused SuperNode, after this many "
        "seconds (default: retry refusals for 300 s)",
    )
    start.add_argument("--dry-run", action="store_true", help="print the command only")
    status = steps.add_parser("status", help="show the site's privacy ledger")
    status.add_argument("config", type=Path, metavar="CONFIG")
    status.add_argument("--json", action="store_true", help="print JSON")


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
    overrides.setdefault("min-available-sites", args.sites)
    overrides.setdefault("min-train-sites", min(2, args.sites))
    config = FederationConfig.from_run_config({**overrides, "out-dir": str(out.resolve())})
    return config, out


def round_line(row: dict[str, Any], total: int) -> str:
    """One terminal line for a finished round of ``metrics.jsonl``."""
    parts = [f"round {row.get('round', '?')}/{total}"]
    if "accuracy" in row:
        parts.append(f"accuracy {float(row['accuracy']):.3f}")
    if "r_at_1_i2t" in row and "r_at_1_t2i" in row:
        parts.append(f"R@1 i2t {float(row['r_at_1_i2t']):.3f} t2i {float(row['r_at_1_t2i']):.3f}")
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

    from server.run_report import read_metrics

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
    sites = summary.get("site_epsilons", {})
    if sites:  # the exact spend, read from the simulated sites' ledgers
        worst = max(sites.values(), key=lambda entry: float(entry["epsilon"]))
        exact = f"{float(worst['epsilon']):.4f} at delta {worst['delta']:g}"
        table.add_row("site epsilon (max, exact)", exact)
    table.add_row("wall time (s)", f"{summary['wall_s_total']:.0f}")
    table.add_row("privacy", summary["privacy"])
    Console().print(table)


def simulate(args: argparse.Namespace) -> int:
    from simulations.local_simulation import SimulationSettings, run_local_simulation

    config, out = _simulation_config(args)
    out.mkdir(parents=True, exist_ok=True)
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
                    num_sites=args.sites,
                    site_max_epsilon=args.site_max_epsilon,
                    num_cpus_per_site=args.cpus_per_site,
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


def _print_audit(report: Any, dst: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedmm deidentify: {dst}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("images processed", str(report.images_processed))
    table.add_row("images with faces", str(report.images_with_faces))
    for detector, count in sorted(report.faces_by_detector.items()):
        table.add_row(f"  faces found by {detector}", str(count))
    table.add_row("captions processed", str(report.captions_processed))
    table.add_row("captions altered", str(report.captions_altered))
    for pii_type, count in sorted(report.pii_by_type.items()):
        table.add_row(f"  {pii_type}", str(count))
    table.add_row("files skipped", str(len(report.skipped)))
    Console().print(table)


def deidentify(args: argparse.Namespace) -> int:
    """``fedmm deidentify SRC DST``: exit 0 when done, 2 on an input the user must fix."""
    from client.deid.folder_run import (
        AUDIT_FILE,
        DeidentifyError,
        check_inputs,
        deidentify_to_folder,
    )
    from client.deid.site_secret import default_site_secret_path

    try:
        inputs = check_inputs(
            args.src,
            args.dst,
            policy_file=args.policy,
            secret_file=args.secret or default_site_secret_path(),
        )
    except DeidentifyError as err:
        print(f"fedmm deidentify: {err}", file=sys.stderr)
        return 2
    if inputs.secret_created:
        print(
            f"created a new site secret at {inputs.secret_file} (mode 0600): keep it and back "
            "it up; the same secret gives the same pseudonyms",
            file=sys.stderr,
        )
    if args.quiet:
        report = deidentify_to_folder(inputs)
    else:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("[bold]de-identifying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as progress:
            task = progress.add_task("", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            report = deidentify_to_folder(inputs, progress=advance)
        _print_audit(report, args.dst)
    if report.skipped:
        print(
            f"{len(report.skipped)} file(s) skipped, listed with the reason in "
            f"{args.dst / AUDIT_FILE}",
            file=sys.stderr,
        )
    print(f"de-identified dataset in {args.dst}; audit in {args.dst / AUDIT_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return simulate(args)
        if args.command == "deidentify":
            return deidentify(args)
        if args.command == "coordinator":
            from server.coordinator_commands import run_coordinator_step

            return run_coordinator_step(args)
        if args.command == "site":
            from client.site_commands import run_site_step

            return run_site_step(args)
        if args.command == "privacy-sweep":
            from simulations.privacy.sweep_command import run_privacy_sweep

            return run_privacy_sweep(args)
    except ConfigError as err:
        print(f"fedmm: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
