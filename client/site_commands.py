"""``fedmm site ...``: a site's deployment commands; print, check, then hand over.

The logic lives in ``client/`` (keys, site config, SuperNode, ledger); these functions print
what they do and exit 2 on anything the user must fix. ``site start`` supervises the Flower
daemon it starts (restarts with a delay, and cleanup of everything it leaves behind:
``client.site_service``); a SIGTERM to the PID the operator started stops them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from fedmm.client.data_rights_commands import add_data_rights_parsers
from fedmm.client.roster_commands import add_roster_parsers


def add_site_parser(commands: Any) -> None:
    """``fedmm site ...`` in the ``fedmm`` command line (its subparsers ``commands``)."""
    site = commands.add_parser(
        "site",
        help="site deployment: key pair, config check, SuperNode, privacy ledger, roster, "
        "data rights (forget, purge, audit)",
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
    status = steps.add_parser(
        "status",
        help="show the site's privacy ledger, runs served (audit log), withdrawals, caches",
    )
    status.add_argument("config", type=Path, metavar="CONFIG")
    status.add_argument("--json", action="store_true", help="print JSON")
    add_roster_parsers(steps)
    add_data_rights_parsers(steps)
    keygen.set_defaults(handler=_keygen)
    check.set_defaults(handler=_check)
    digest.set_defaults(handler=_release_digest)
    start.set_defaults(handler=_start)
    status.set_defaults(handler=_status)


def _keygen(args: argparse.Namespace) -> int:
    from fedmm.client.site_keys import generate_site_key_pair

    pair = generate_site_key_pair(args.dir, comment=args.comment)
    print(f"private key {pair.private_key} (0600: never leaves this machine)")
    print(f"public key  {pair.public_key} (send it to the coordinator)")
    print(f"fingerprint {pair.fingerprint} (confirm it with the coordinator out of band)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedmm.client.site_config import check_site_config

    print("checking (the installed release's digest takes a few seconds)...", file=sys.stderr)
    config = check_site_config(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{config.source}: ok")
    pin = config.release_pin
    print(f"  runs only fedmm {pin.version}, {pin.digest} (installed)")
    for key, value in config.node_config().items():
        print(f"  {key} = {value}")
    return 0


def _release_digest(args: argparse.Namespace) -> int:
    from fedmm.common.release_identity import release_directory, release_files, release_identity

    directory = args.app.resolve() if args.app else release_directory()
    print(f"building the FAB of {directory} (as flwr run does)...", file=sys.stderr)
    identity = release_identity(directory)
    if args.files:
        for name in release_files(directory):
            print(name)
        return 0
    print(f"{identity.fab_id} {identity.version} in {identity.directory}")
    print(f'[release]\nversion = "{identity.version}"\ndigest = "{identity.digest}"')
    return 0


def _start(args: argparse.Namespace) -> int:
    from fedmm.client.site_config import check_site_config, prepare_site_folders
    from fedmm.client.site_executor import runner_argv
    from fedmm.client.site_service import DEFAULT_RETRY_SECONDS, SiteService, run_site_service
    from fedmm.client.supernode_launch import (
        SUPEREXEC_POLL_ENV,
        runtime_api_address,
        shell_line,
        supernode_argv,
        supernode_environment,
    )
    from fedmm.common.flower_commands import flower_environment

    print("checking the site config and the installed release...", file=sys.stderr)
    config = check_site_config(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    argv = supernode_argv(
        config,
        superlink=args.superlink,
        ca_cert=args.ca_cert,
        port=args.port,
        max_wait_time=args.max_wait_time,
    )
    extra = supernode_environment(os.environ)
    address = runtime_api_address(args.port)
    print(shell_line(argv, extra), flush=True)
    runner = shlex.join(runner_argv(runtime_api_address=address, pin=config.release_pin))
    print(f"site runner: {runner} (a task token a line on stdin)", flush=True)
    if args.dry_run:
        return 0
    os.umask(0o077)  # files the SuperNode and the runners create are private
    for folder in prepare_site_folders(config):
        print(f"created {folder} (0700)", file=sys.stderr)
    env = flower_environment(extra)
    service = SiteService(
        supernode_argv=argv,
        env=env,
        runtime_api_address=address,
        pin=config.release_pin,
        cwd=config.source.resolve().parent,
        retry_for=args.max_wait_time if args.max_wait_time is not None else DEFAULT_RETRY_SECONDS,
        poll_interval=float(env.get(SUPEREXEC_POLL_ENV, "0.1")),
    )
    return run_site_service(service)


def _status(args: argparse.Namespace) -> int:
    from fedmm.client.data_rights import data_rights_status
    from fedmm.client.site_config import load_site_config
    from fedmm.client.supernode_launch import ledger_status

    config = load_site_config(args.config)
    status = ledger_status(config)
    rights = data_rights_status(config)
    if args.json:
        print(json.dumps(status.to_dict() | {"data_rights": rights}, indent=2))
        return 0
    print(f"privacy ledger {status.ledger_file}" + ("" if status.exists else " (none yet)"))
    print(f"  accountant        {status.accountant}")
    print(f"  delta             {status.delta:g}" if status.delta else "  delta             -")
    budget = "" if status.max_epsilon is None else f" of {status.max_epsilon:g}"
    print(f"  epsilon spent     {status.epsilon:.4f}{budget}")
    if status.remaining is not None:
        print(f"  epsilon remaining {status.remaining:.4f}")
    sigma = "-" if status.noise_multiplier is None else f"{status.noise_multiplier:.4f}"
    print(f"  noise multiplier  {sigma}")
    print(f"  rounds trained    {len(status.rounds)} {status.rounds}")
    print(f"  DP-SGD steps      {status.steps} in {status.entries} accountant entries")
    print(f"  noisy counts      {status.count_releases} released (one a run)")
    _print_data_rights(rights)
    return 0


def _print_data_rights(rights: dict[str, Any]) -> None:
    print(f"audit log {rights['audit_log']} (`fedmm site audit` prints it)")
    print(
        f"  runs served       {rights['runs_served']} ({rights['rounds_trained']} rounds "
        f"trained, {rights['rounds_evaluated']} evaluated)"
    )
    refusals = ", ".join(f"{code} x{n}" for code, n in rights["refusals"].items())
    print(f"  refusals          {refusals or 'none'}")
    last = rights["last_run"]
    if last is not None:
        print(
            f"  last run          {last['run_id']} at {last['last']} from "
            f"{last['coordinator_address'] or '-'} (certificate "
            f"{last['coordinator_certificate_sha256'] or '-'})"
        )
    if rights["unreadable_audit_lines"]:
        print(f"  unreadable lines  {rights['unreadable_audit_lines']} (torn by a crash)")
    print(f"withdrawals {rights['withdrawals_file']}")
    withdrawn = rights["records_withdrawn"]
    since = f" (last {rights['last_withdrawal']})" if withdrawn else ""
    print(f"  records withdrawn {withdrawn}{since}")
    print(f"de-identification cache {rights['cache_dir']} (encrypted)")
    print(
        f"  entries           {rights['cache_entries']}, kept {rights['cache_retention_days']:g} "
        "days (`fedmm site purge`)"
    )
