"""One federated training run of the sweep: ``fedmm simulate`` in a child process.

A child process per run keeps each run's Ray cluster, memory and Flower state apart and
makes sure none of it outlives the run: the child gets its own process group, and when the
run is interrupted or times out, that group (the child and what it started) is stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class FederatedRunError(RuntimeError):
    """``fedmm simulate`` failed; the message names its log file."""


@dataclass(frozen=True)
class FederatedRunSpec:
    """What to run: the ``fedmm simulate`` options and run-config overrides."""

    sites: int
    rounds: int
    epsilon: float
    partition: str
    run_config: dict[str, str]  # --set KEY=VALUE pairs
    site_data: tuple[str, ...] = ()  # --site-data: each site's imagefolder (empty: benchmark)

    def arguments(self, out: Path) -> list[str]:
        args = [
            "simulate",
            "--sites",
            str(self.sites),
            "--rounds",
            str(self.rounds),
            "--epsilon",
            "inf" if math.isinf(self.epsilon) else repr(float(self.epsilon)),
            "--partition",
            self.partition,
            "--out",
            str(out),
            "--quiet",
        ]
        for key, value in self.run_config.items():
            args += ["--set", f"{key}={value}"]
        if self.site_data:
            args += ["--site-data", *self.site_data]
        return args


@dataclass(frozen=True)
class FederatedRunResult:
    """The run's final metrics (``summary.json``) and its wall time in seconds."""

    out: Path
    summary: dict[str, Any]
    wall_s: float


def simulate_in_child_process(
    spec: FederatedRunSpec, out: Path, *, timeout_s: float = 3600.0
) -> FederatedRunResult:
    """Run ``fedmm simulate`` into ``out`` (its log: ``out.log`` beside it); reuse a finished
    run found there (its ``wall_s`` then comes from ``out/wall-time.json``)."""
    out = Path(out).resolve()
    wall_file = out / "wall-time.json"
    if (out / "summary.json").exists() and wall_file.exists():
        summary = json.loads((out / "summary.json").read_text())
        return FederatedRunResult(out, summary, float(json.loads(wall_file.read_text())["wall_s"]))
    if out.exists() and any(out.iterdir()):
        raise FederatedRunError(f"{out} holds an unfinished run: remove it to run it again")
    log = out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as handle:
        child = subprocess.Popen(
            [sys.executable, "-m", "fedmm.simulations.cli", *spec.arguments(out)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env=env,
            start_new_session=True,  # its own process group, stopped below if need be
        )
        try:
            code = child.wait(timeout=timeout_s)
        except BaseException:  # timeout, Ctrl-C: stop the child's group, then re-raise
            _stop_group(child)
            raise
    wall_s = time.monotonic() - started
    if code != 0 or not (out / "summary.json").exists():
        raise FederatedRunError(f"fedmm simulate exited with {code}; see {log}")
    wall_file.write_text(json.dumps({"wall_s": wall_s}))
    return FederatedRunResult(out, json.loads((out / "summary.json").read_text()), wall_s)


def _stop_group(child: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
