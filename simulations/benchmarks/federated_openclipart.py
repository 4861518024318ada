"""Federated OpenClipart: recall on the sites' held-out records against chance.

Builds (once, in ``DATA``) the OpenClipart imagefolder (``openclipart_imagefolder``), then
runs ``fedmm simulate --site-data`` on it and prints JSON: the federation's recall on the
sites' held-out records (``federated_eval`` of the last round, summed under SecAgg+), the
chance level on the same splits, the shuffled control, the ratio of R@10 image->text to
chance, the wall time and the exact command. Conditions:

- ``plain``: ``train/`` split into ``--sites`` (5) IID sites, 64x64 colour, DP off;
- ``dp``: the same with DP-SGD at ``--epsilon`` (8), site-local by default or
  ``--dp distributed``;
- ``folders``: ``train/`` cut into ``--folders`` (3) folders of ``--per-folder`` (600)
  images, one site each, with DP-SGD at ``--epsilon`` and SecAgg+ (the wall-time target:
  5 rounds within 10 minutes on 2 cores).

The recipe is ``docs/real-data.md``'s measured one (width 32, 8x8 patches, 4,096 buckets,
24 words, 8 distractors from the word lists and the caption bank, Adam at 0.002, batch 256);
``--set KEY=VALUE`` overrides any run-config key. Usage::

    python -m fedmm.simulations.benchmarks.federated_openclipart DATA --condition plain --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedmm.common.data.imagefolder import METADATA_FILE
from fedmm.simulations.benchmarks.openclipart_imagefolder import (
    BANK_FILE,
    build_openclipart_benchmark,
)

RECIPE = {
    "image-size": "64x64",
    "image-channels": 3,
    "model-patch-size": 8,
    "model-width": 32,
    "model-vocab-buckets": 4096,
    "model-caption-words": 24,
    "distractor-word-lists": "colours,positions,counts,sizes",
    "num-distractors": 8,
    "batch-size": 256,
    "optimizer": "adam",
    "learning-rate": 0.002,
}


def openclipart_data(data: Path) -> Path:
    """``data`` holding the OpenClipart benchmark (built on first use)."""
    if not (data / "train" / METADATA_FILE).exists():
        build_openclipart_benchmark(data)
    return data


def cut_folders(train: Path, out: Path, *, count: int, per_folder: int) -> list[Path]:
    """``count`` imagefolders of ``per_folder`` consecutive records of ``train`` (images
    linked, not copied)."""
    lines = (train / METADATA_FILE).read_text(encoding="utf-8").splitlines()
    if len(lines) < count * per_folder:
        raise SystemExit(f"{train} has {len(lines)} records, fewer than {count} x {per_folder}")
    folders = []
    for index in range(count):
        folder = out / f"folder-{index}"
        chosen = lines[index * per_folder : (index + 1) * per_folder]
        for line in chosen:
            name = json.loads(line)["file_name"]
            target = folder / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(train / name, target)
        (folder / METADATA_FILE).write_text("\n".join(chosen) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


def simulate_command(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    """The ``fedmm simulate`` command of the condition."""
    if args.condition == "folders":
        folders = cut_folders(
            data / "train", out.parent / "folders", count=args.folders, per_folder=args.per_folder
        )
        sites = [*map(str, folders)]
    else:
        sites = [str(data / "train"), "--sites", str(args.sites), "--partition", "iid"]
    settings = {**RECIPE, "caption-bank": str((data / BANK_FILE).resolve())}
    for pair in args.set:
        key, _, value = pair.partition("=")
        settings[key] = value
    epsilon = "inf" if args.condition == "plain" else str(args.epsilon)
    command = [
        sys.executable,
        "-m",
        "fedmm.simulations.cli",
        "simulate",
        "--site-data",
        *sites,
        "--rounds",
        str(args.rounds),
        "--epsilon",
        epsilon,
        "--out",
        str(out),
        "--quiet",
    ]
    if args.dp:
        command += ["--dp", args.dp]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder for the OpenClipart benchmark")
    parser.add_argument("--condition", choices=("plain", "dp", "folders"), default="plain")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--dp", choices=("local", "distributed"))
    parser.add_argument("--folders", type=int, default=3)
    parser.add_argument("--per-folder", type=int, default=600)
    parser.add_argument("--out", type=Path, help="the run's folder (default DATA/runs/...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    data = openclipart_data(args.data.resolve())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or data / "runs" / f"{args.condition}-{stamp}").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    command = simulate_command(args, data, out)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    report: dict[str, object] = {
        "condition": args.condition,
        "command": " ".join(command[1:]),
        "returncode": result.returncode,
        "wall_s": round(wall, 1),
        "out": str(out),
    }
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        federated = summary.get("federated_eval") or {}
        report["federated_eval"] = federated
        report["site_epsilons"] = summary.get("site_epsilons")
        if federated.get("chance_r_at_10"):
            ratio = float(federated["r_at_10_i2t"]) / float(federated["chance_r_at_10"])
            report["r_at_10_i2t_over_chance"] = round(ratio, 3)
    else:
        report["stderr_tail"] = result.stderr[-2000:]
    print(json.dumps(report, indent=2))
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
