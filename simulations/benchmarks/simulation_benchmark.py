"""Wall time, per-round time and peak memory of a whole ``fedmm simulate`` run.

Runs ``fedmm simulate`` with the given arguments in a subprocess and samples, every second,
the summed proportional set size (PSS) of every process of the run: the CLI and Ray's
processes, which Ray starts outside the CLI's process tree, found by a marker in their
environment (every process the run starts inherits it), so other work on the machine does
not count. Prints JSON. Examples:
    python -m fedmm.simulations.benchmarks.simulation_benchmark            # the default run
    python -m fedmm.simulations.benchmarks.simulation_benchmark -- --sites 1000 \
        --set fraction-train=0.1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

#: The environment entry that marks the run's processes.
MARKER_VARIABLE = "FEDMM_BENCHMARK_RUN"


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


def _marked_pids(marker: str) -> list[str]:
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(entry.name)
            except OSError:
                continue
    return pids


def _run_memory_mb(marker: str) -> tuple[float, int]:
    """The run's summed PSS in MB and how many processes it has."""
    pids = _marked_pids(marker)
    return sum(_pss_kb(pid) for pid in pids) / 1024, len(pids)


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
        marker = uuid.uuid4().hex
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", MARKER_VARIABLE: marker},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak, peak_processes = 0.0, 0
        while process.poll() is None:
            memory, processes = _run_memory_mb(marker)
            peak, peak_processes = max(peak, memory), max(peak_processes, processes)
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
            "peak_processes": peak_processes,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "targets": {
                "default_wall_s_at_most": 600,
                "default_wall_s_speed_target": 150,
                "default_peak_rss_mb_below": 4096,
                "100_sites_peak_rss_mb_below": 6144,
                "1000_sites_100_a_round_peak_mb_below": 8192,
            },
        }
        if process.returncode != 0:
            result["stderr_tail"] = process.stderr.read()[-2000:] if process.stderr else ""
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
