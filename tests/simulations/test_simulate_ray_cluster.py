"""``fedmm simulate --ray-address``: the sites run on an existing Ray cluster.

The cluster is a real one-node Ray head (`ray start --head --block`) on loopback, started in
its own session and a temporary folder by the fixture and stopped by it (its process group,
by PID; never `ray stop`, which would end every Ray on the machine). The run must connect to
it rather than start a Ray of its own: the cluster's own log folder then holds the driver's
log and the site actors' logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from tests.simulations.marked_processes import new_marker, none_left, processes_marked

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

SMALL = [
    "--set",
    "site-records-limit=120",
    "--set",
    "eval-single-items=200",
    "--set",
    "eval-scenes=50",
    "--set",
    "batch-size=32",
    "--set",
    "eval-every=1",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_group(process: subprocess.Popen[bytes], marker: dict[str, str]) -> None:
    """SIGTERM to the head's process group, then SIGKILL to whatever it marked and left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    if not none_left(marker, wait_s=20):
        for pid in processes_marked(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A Ray head on 127.0.0.1 with 2 CPUs: (address, its temp folder, its marker)."""
    marker = new_marker()
    # A short folder: Ray's socket paths under it must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    port = _free_port()
    ray = Path(sys.executable).parent / "ray"
    log = (temp_dir / "head.log").open("wb")
    head = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **marker},
    )
    try:
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in (temp_dir / "head.log").read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start --head failed:\n" + (temp_dir / "head.log").read_text())
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir, marker
    finally:
        _stop_group(head, marker)
        log.close()
        assert none_left(marker, wait_s=5), "the Ray head left processes behind"
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _simulate(out: Path, *args: str, marker: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmm.simulations.cli", "simulate", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **marker},
        cwd=Path(__file__).parents[2],
    )


def test_sites_run_on_an_existing_ray_cluster(
    tmp_path: Path, ray_head: tuple[str, Path, dict[str, str]]
) -> None:
    address, head_dir, _ = ray_head
    marker = new_marker()
    out = tmp_path / "run"
    args = ["--sites", "3", "--rounds", "1", "--cpus-per-site", "1", "--quiet", *SMALL]
    result = _simulate(out, "--ray-address", address, *args, marker=marker)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["sites_trained"] == 3
    # The run was a driver of the cluster and its sites were the cluster's actors.
    logs = [p.name for p in head_dir.glob("session_*/logs/*")]
    assert any(name.startswith("python-core-driver-") for name in logs), logs
    assert sum(name.startswith("python-core-worker-") for name in logs) >= 1, logs
    # The driver disconnected and started no Ray of its own; the cluster is still up.
    assert none_left(marker), "the run left processes behind"
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        pass


def test_an_address_where_no_cluster_answers_fails_at_once_with_the_fix(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    port = _free_port()
    result = _simulate(out, "--ray-address", f"127.0.0.1:{port}", "--rounds", "1", marker={})
    assert result.returncode == 2
    assert f"--ray-address 127.0.0.1:{port}" in result.stderr
    assert "ray start --head" in result.stderr
    assert not out.exists()  # nothing written for a run that cannot start
