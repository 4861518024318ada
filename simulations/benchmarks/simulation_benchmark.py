"""Wall time, per-round time and peak memory of a whole ``fedmm simulate`` run.

Runs ``fedmm simulate`` with the given arguments in a subprocess and samples, every second,
the summed proportional set size (PSS) of every process of the run (the CLI and Ray's
processes, which Ray starts outside the CLI's process tree: matched by name). Prints JSON.
Examples:
    python -m fedmm.simulations.benchmarks.simulation_benchmark            # the default run
    python -m fedmm.simulations.benchmarks.simulation_benchmark -- --sites 100 \
        --set fraction-train=0.1 --rounds 3
Run it on an otherwise idle machine: other processes named python or ray count too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_NAMES = ("python", "ray::", "raylet", "gcs_server", "fedmm")


def _pss_kb(pid: str) -> int:
    """Proportional set size: shared pages (torch's libraries, Ray's object store) are
    split between the processes that map them, so the sum is the memory really used."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        pass
    return 0


def _total_memory_mb() -> float:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    total_kb = 0
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if any(name in args for name in _NAMES) and "simulation_benchmark" not in args:
            total_kb += _pss_kb(pid)
    return total_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("simulate_args", nargs="*", help="arguments for fedmm simulate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "fedmm.simulations.cli",
            "simulate",
            "--quiet",
            "--out",
            str(out),
            *args.simulate_args,
        ]
        baseline = _total_memory_mb()
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, _total_memory_mb() - baseline)
            time.sleep(1.0)
        wall = time.monotonic() - started
        rows = (
            [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            if (out / "metrics.jsonl").exists()
            else []
        )
        result = {
            "command": "fedmm simulate " + " ".join(args.simulate_args),
            "exit_code": process.returncode,
            "wall_s": round(wall, 1),
            "rounds": len(rows),
            "round_wall_s": [r.get("wall_s") for r in rows],
            "final_accuracy": rows[-1].get("accuracy") if rows else None,
            "final_epsilon_bound_max": rows[-1].get("epsilon_bound_max") if rows else None,
            "peak_memory_mb_pss": round(peak),
            "targets": {
                "default_wall_s_at_most": 600,
                "default_peak_rss_mb_below": 4096,
                "100_sites_peak_rss_mb_below": 6144,
            },
        }
        if process.returncode != 0:
            result["stderr_tail"] = process.stderr.read()[-2000:] if process.stderr else ""
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
