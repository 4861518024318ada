"""Turn OpenClipart (Debian ``openclipart-png`` + ``openclipart-svg``) into a real image-text
benchmark: two imagefolders and a public caption bank, the same bytes on every run.

Writes to ``OUT`` (which must be new or empty)::

    OUT/train/metadata.jsonl + OUT/train/images/<category>/...png   site records
    OUT/test/metadata.jsonl  + OUT/test/images/...                   held-out records
    OUT/caption-bank.txt     the captions of the bank records, sorted, one a line (a
                             caption shared by n bank records is on n lines)
    OUT/manifest.json        counts, split rule, the bank's SHA-256

Each metadata line is ``{"file_name", "label" (top-level category), "text" (caption from
the SVG's title, description and keywords)}`` (``common.data.openclipart``). Bank records
(``--bank-percent``, by SHA-256 of their path) give only their captions and are in neither
imagefolder. Prints the manifest as JSON. Usage::

    python -m fedmm.simulations.benchmarks.openclipart_imagefolder OUT \\
        [--per-category N] [--bank-percent 15] [--test-percent 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from fedmm.common.data.caption_bank import CaptionBank
from fedmm.common.data.imagefolder import METADATA_FILE
from fedmm.common.data.openclipart import (
    OPENCLIPART_ROOT,
    ClipartRecord,
    OpenClipartNotFoundError,
    check_installed,
    openclipart_records,
    split_of,
)

BANK_FILE = "caption-bank.txt"
MANIFEST_FILE = "manifest.json"


def build_openclipart_benchmark(
    out: Path,
    *,
    source: Path = OPENCLIPART_ROOT,
    per_category: int | None = None,
    bank_percent: int = 15,
    test_percent: int = 10,
) -> dict[str, object]:
    """Write the benchmark to ``out`` (new or empty) and return its manifest."""
    png_root, _ = check_installed(source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: name a new folder")
    splits: dict[str, list[ClipartRecord]] = {"bank": [], "test": [], "train": []}
    for record in openclipart_records(source, per_category=per_category):
        split = split_of(record, bank_percent=bank_percent, test_percent=test_percent)
        splits[split].append(record)
    for split in ("train", "test"):
        _write_imagefolder(out / split, splits[split], png_root)
    bank_captions = sorted(record.caption for record in splits["bank"])
    bank_summary = None
    if bank_captions:  # none with --bank-percent 0
        (out / BANK_FILE).write_text("".join(c + "\n" for c in bank_captions), encoding="utf-8")
        bank = CaptionBank.from_file(out / BANK_FILE)
        bank_summary = {
            "file": BANK_FILE,
            "lines": len(bank.captions),
            "distinct_captions": len(set(bank.captions)),
            "sha256": bank.sha256,
        }
    manifest: dict[str, object] = {
        "source": str(source),
        "per_category": per_category,
        "split": {
            "rule": "SHA-256 of the PNG path below png/, first 8 bytes big-endian, mod 100: "
            "bank below bank_percent, then test below bank_percent + test_percent",
            "bank_percent": bank_percent,
            "test_percent": test_percent,
        },
        "records": {split: len(records) for split, records in splits.items()},
        "labels": {
            split: dict(sorted(Counter(r.category for r in splits[split]).items()))
            for split in ("train", "test")
        },
        "caption_bank": bank_summary,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _write_imagefolder(folder: Path, records: list[ClipartRecord], png_root: Path) -> None:
    lines = []
    for record in records:
        file_name = f"images/{record.png}"
        target = folder / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png_root / record.png, target)
        entry = {"file_name": file_name, "label": record.category, "text": record.caption}
        lines.append(json.dumps(entry, ensure_ascii=False, sort_keys=True))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (new or empty)")
    parser.add_argument("--source", type=Path, default=OPENCLIPART_ROOT)
    parser.add_argument(
        "--per-category",
        type=int,
        default=None,
        metavar="N",
        help="only the first N drawings of each category (a small subset)",
    )
    parser.add_argument("--bank-percent", type=int, default=15)
    parser.add_argument("--test-percent", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        manifest = build_openclipart_benchmark(
            args.out,
            source=args.source,
            per_category=args.per_category,
            bank_percent=args.bank_percent,
            test_percent=args.test_percent,
        )
    except (OpenClipartNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
