"""``fedmm deidentify SRC DST``: a site de-identifies its imagefolder dataset into a copy.

The work is ``client.deid.folder_run``; this prints progress and the audit's counts, and
exits 2 on an input the user must fix. See docs/deidentification.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_deidentify_parser(commands: Any) -> None:
    """``fedmm deidentify SRC DST`` in the ``fedmm`` command line (its subparsers)."""
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


def run_deidentify(args: argparse.Namespace) -> int:
    """``fedmm deidentify SRC DST``: exit 0 when done, 2 on an input the user must fix."""
    from fedmm.client.deid.folder_run import (
        AUDIT_FILE,
        DeidentifyError,
        check_inputs,
        deidentify_to_folder,
    )
    from fedmm.client.deid.site_secret import default_site_secret_path

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
