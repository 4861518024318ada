"""``fedmm coordinator ...``: the coordinator's deployment commands; print, check, hand over.

The logic lives in ``server/`` (CA, SuperLink, run submission); these functions print what
they do and exit 2 on anything the user must fix. ``start-superlink`` supervises the Flower
daemons it starts (restarts with a delay, and cleanup of everything the daemons leave
behind: ``server.coordinator_service``); a SIGTERM to the PID the operator started stops
them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedmm.common.cli_arguments import report_user_error

#: ``submit``: the run ended, but sites trained in fewer rounds than asked.
TRAINED_TOO_LITTLE = 3


def add_coordinator_parser(commands: Any) -> None:
    """``fedmm coordinator ...`` in the ``fedmm`` command line (its subparsers ``commands``)."""
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
    init_ca.set_defaults(handler=_init_ca)
    issue.set_defaults(handler=_issue_cert)
    start.set_defaults(handler=_start_superlink)
    conn.set_defaults(handler=_add_connection)
    register.set_defaults(handler=_register_site)
    submit.set_defaults(handler=_submit)


def _init_ca(args: argparse.Namespace) -> int:
    from fedmm.server.certificate_authority import init_ca

    ca = init_ca(args.dir)
    print(f"CA certificate {ca.cert_file} (give it to every site; valid to {ca.not_valid_after})")
    print(f"CA private key {ca.key_file} (0600: keep it secret and offline when unused)")
    return 0


def _issue_cert(args: argparse.Namespace) -> int:
    from fedmm.server.certificate_authority import issue_server_certificate

    cert = issue_server_certificate(
        args.dir,
        subject_alternative_names=args.san,
        include_loopback=not args.no_loopback,
        days=args.days,
    )
    print(f"SuperLink certificate {cert.cert_file} for {', '.join(cert.subject_alternative_names)}")
    print(f"  valid to {cert.not_valid_after}")
    print(f"SuperLink private key {cert.key_file} (0600: only on the SuperLink's machine)")
    return 0


def _start_superlink(args: argparse.Namespace) -> int:
    from fedmm.common.flower_commands import flower_environment
    from fedmm.server.certificate_authority import CA_CERT, SERVER_CERT, SERVER_KEY
    from fedmm.server.coordinator_service import CoordinatorService, run_coordinator_service
    from fedmm.server.fleet_proxy import fleet_proxy
    from fedmm.server.superlink_control import split_address, superlink_launch

    launch = superlink_launch(
        args.dir,
        address=args.address,
        database=args.database,
        log_file=args.log_file,
        public_address=args.public_address,
        expose_control_api=args.expose_control_api,
    )
    proxy = None
    if args.public_address is not None:
        directory = args.dir.resolve()
        public_host, public_port = split_address(args.public_address)
        proxy = fleet_proxy(
            directory,
            public_host=public_host,
            public_port=public_port,
            superlink_port=split_address(args.address)[1],
            certificate=directory / SERVER_CERT,
            key=directory / SERVER_KEY,
            ca_certificate=directory / CA_CERT,
        )
    print(launch.shell_line(), flush=True)
    if proxy is not None:
        print(shlex.join(proxy.argv))
        print(
            f"sites connect to {args.public_address} (TLS; only the Fleet API is forwarded, "
            f"config {proxy.config_file}); flwr connects to {args.address} on this machine",
            flush=True,
        )
    if args.dry_run:
        return 0
    os.umask(0o077)  # the SuperLink's database and logs, the proxy's files: private
    if proxy is not None:
        proxy.write()
        tested = subprocess.run(proxy.test_argv, capture_output=True, text=True, check=False)
        if tested.returncode != 0:
            return report_user_error(
                "fedmm coordinator start-superlink",
                f"nginx refuses its config {proxy.config_file}:\n{tested.stderr.strip()}",
            )
    service = CoordinatorService(
        superlink_argv=launch.argv,
        env=flower_environment(launch.env),
        cwd=args.dir.resolve(),
        proxy_argv=proxy.argv if proxy is not None else None,
    )
    return run_coordinator_service(service)


def _add_connection(args: argparse.Namespace) -> int:
    from fedmm.server.superlink_control import add_connection

    path = add_connection(args.name, address=args.address, root_certificates=args.ca_cert)
    print(f"connection {args.name!r} -> {args.address} (CA {args.ca_cert}) in {path}")
    return 0


def _register_site(args: argparse.Namespace) -> int:
    from fedmm.common.key_files import fingerprint
    from fedmm.server.superlink_control import register_site_argv

    argv = register_site_argv(args.public_key, connection=args.connection, name=args.name)
    print(f"site key {fingerprint(args.public_key.read_bytes())}")
    print(shlex.join(argv), flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    node_id = None
    start = done.stdout.find("{")
    if start >= 0:  # --format json prints one (indented) JSON object
        try:
            node_id = json.JSONDecoder().raw_decode(done.stdout[start:])[0].get("node-id")
        except (json.JSONDecodeError, AttributeError):
            node_id = None
    if done.returncode != 0 or node_id is None:
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode or 1
    print(f"registered: node id {node_id}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from fedmm.common.flower_commands import flower_environment
    from fedmm.common.release_identity import release_identity
    from fedmm.server.run_submission import (
        check_superlink_reachable,
        parse_settings,
        prepare_submission,
        record_submission,
        run_id_in,
        run_progress,
        stop_active_runs,
        training_shortfall,
        write_submitted_config,
    )
    from fedmm.server.site_names import name_node_ids

    submission = prepare_submission(
        connection=args.connection,
        out_dir=args.out_dir,
        settings=parse_settings(args.set),
        resume=args.resume,
        app_dir=args.app,
        stream=not args.detach,
        dry_run=args.dry_run,
    )
    out = submission.out_dir
    if args.resume:
        after = submission.resume_after
        print(
            f"resuming the run in {out} after round {after} (its last checkpoint)"
            if after
            else f"no checkpoint in {out} yet: the run starts again at round 1"
        )
    app = release_identity(Path(submission.argv[2]))
    print(
        f"app {app.fab_id} {app.version}, release digest {app.digest} (sites run a run only "
        "when it is the release they pinned)",
        file=sys.stderr,
    )
    print(submission.shell_line(), flush=True)
    if args.dry_run:
        return 0
    env = flower_environment(submission.env)
    check_superlink_reachable(args.connection, env)
    if args.resume:
        for run_id in stop_active_runs(out, args.connection, env):
            print(f"stopped the earlier run {run_id} of {out}: it was still running")
    names = _site_names(args.connection, out)
    write_submitted_config(submission)
    process = subprocess.Popen(
        submission.argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert process.stdout is not None
    run_id = None
    try:
        for line in process.stdout:
            sys.stdout.write(name_node_ids(line, names))
            if run_id is None and (run_id := run_id_in(line)) is not None:
                record_submission(
                    out, run_id=run_id, connection=args.connection, resume=args.resume
                )
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()
        print(f"\nstopped following run {run_id}; it goes on at the SuperLink", file=sys.stderr)
        return 130
    again = ["fedmm", "coordinator", "submit", "--connection", args.connection]
    resume = shlex.join([*again, "--out-dir", str(out), "--resume"])
    if run_id is None:
        print(f"flwr run did not start a run (exit {code}): see its output above", file=sys.stderr)
        return code or 1
    if args.detach:
        print(
            f"run {run_id} started; outputs in {out} (follow: flwr log {run_id} "
            f"{args.connection}); if the coordinator stops mid-run: {resume}"
        )
        return 0
    progress = run_progress(out, num_server_rounds=submission.num_server_rounds)
    if progress.finished:
        _add_sites_to_report(out, names)
        shortfall = training_shortfall(out, num_server_rounds=submission.num_server_rounds)
        if shortfall is None:
            print(f"run {run_id} finished {submission.num_server_rounds} rounds; outputs in {out}")
            return 0
        print(f"run {run_id} ended but {shortfall}.", file=sys.stderr)
        if shortfall.startswith("sites trained in 0 "):
            untrained = out / "model-untrained.safetensors"
            (out / "model.safetensors").replace(untrained)
            print(f"the model is the initial one: kept as {untrained}", file=sys.stderr)
        return TRAINED_TOO_LITTLE
    last = progress.last_checkpoint
    print(
        f"run {run_id} did not finish (flwr run exit {code}; last checkpoint: "
        f"{f'round {last}' if last else 'none'}). Outputs so far in {out}. Once the SuperLink "
        f"is back, continue with: {resume}",
        file=sys.stderr,
    )
    return 1


def _site_names(connection: str, out: Path) -> dict[int, str]:
    """The registered sites' names (printed, and kept in the out dir's ``sites.json``)."""
    from fedmm.server.site_names import registered_site_names, write_sites_file

    try:
        names = registered_site_names(connection)
    except Exception as err:  # the run does not depend on names
        print(f"could not read the sites' names from the SuperLink: {err}", file=sys.stderr)
        return {}
    listed = ", ".join(f"{name} (node {node})" for node, name in sorted(names.items()))
    print(f"registered sites: {listed or 'none named'}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_sites_file(out, names)
    return names


def _add_sites_to_report(out: Path, names: dict[int, str]) -> None:
    from fedmm.server.site_names import sites_section

    report = out / "report.md"
    if names and report.exists():
        with report.open("a", encoding="utf-8") as handle:
            handle.write(sites_section(names))
