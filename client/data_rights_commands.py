"""``fedmm site forget|purge|audit``: the site's data-rights commands (``client.data_rights``).

Each prints what it did; problems the operator must fix exit 2 with the input named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_data_rights_parsers(steps: Any) -> None:
    """``forget``, ``purge`` and ``audit`` under ``fedmm site`` (its subparsers ``steps``)."""
    forget = steps.add_parser(
        "forget",
        help="withdraw records: left out of every later round and removed from the caches",
        description="Withdraw records by the file_name metadata.jsonl gives them: recorded "
        "(keyed digest and time, never content) in the withdrawals file, removed from the "
        "de-identification cache now, left out of training and evaluation from the next "
        "round on (a running site too). Models trained before keep the record's influence, "
        "bounded by their DP guarantee (docs/site-guide.md, data rights).",
    )
    forget.add_argument("config", type=Path, metavar="CONFIG")
    forget.add_argument(
        "--file-name", action="append", default=[], metavar="NAME", help="repeatable"
    )
    forget.add_argument(
        "--names-file", type=Path, metavar="FILE", help="file names, one a line (# comments)"
    )
    forget.add_argument(
        "--allow-missing",
        action="store_true",
        help="record names metadata.jsonl does not hold (records already deleted)",
    )
    purge = steps.add_parser(
        "purge",
        help="remove cache entries past the retention period or built from changed data",
    )
    purge.add_argument("config", type=Path, metavar="CONFIG")
    purge.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    audit = steps.add_parser("audit", help="print or export the audit log of runs served")
    audit.add_argument("config", type=Path, metavar="CONFIG")
    audit.add_argument("--format", choices=("text", "json"), default="text")
    audit.add_argument("--output", type=Path, metavar="FILE", help="write here (0600)")
    forget.set_defaults(handler=_forget)
    purge.set_defaults(handler=_purge)
    audit.set_defaults(handler=_audit)


def _forget(args: argparse.Namespace) -> int:
    from fedmm.client.data_rights import forget_records, read_names_file
    from fedmm.client.site_config import load_site_config

    config = load_site_config(args.config)
    names = list(args.file_name)
    if args.names_file is not None:
        names += read_names_file(args.names_file)
    result = forget_records(config, names, allow_missing=args.allow_missing)
    print(
        f"withdrawn {len(result.recorded)} record(s) in {result.withdrawals_file}"
        + (f" ({len(result.already)} withdrawn before)" if result.already else "")
    )
    print(f"removed {result.cache_records_removed} record(s) from the de-identification cache")
    print(
        "from the next round on they are left out of training and evaluation; models "
        "trained before keep their influence, bounded by the DP guarantee of those runs "
        "(`fedmm site status` shows the ledger's epsilon)"
    )
    return 0


def _purge(args: argparse.Namespace) -> int:
    from fedmm.client.data_rights import purge_caches
    from fedmm.client.site_config import load_site_config

    result = purge_caches(load_site_config(args.config), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for name, why in result.removed:
        print(f"{verb} {name}: {why}")
    for name, why in result.kept:
        print(f"kept {name}: {why}")
    print(f"{verb} {len(result.removed)}, kept {len(result.kept)} in {result.cache_dir}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedmm.client.data_rights import audit_report
    from fedmm.client.site_audit import audit_text, read_audit_log
    from fedmm.client.site_config import load_site_config

    config = load_site_config(args.config)
    if args.format == "json":
        text = json.dumps(audit_report(config), indent=2) + "\n"
    else:
        text = f"audit log {config.audit_log}\n" + audit_text(read_audit_log(config.audit_log))
    if args.output is None:
        sys.stdout.write(text)
        return 0
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {args.output} ({args.format}, 0600)", file=sys.stderr)
    return 0
