"""Deployment on loopback with real Flower daemons, started through the ``fedmm`` commands:
a SuperLink with TLS and SuperNode authentication and SuperNodes of registered and
unregistered sites. Every process started is stopped by PID, and its ports are free after.

- default: the unregistered SuperNode is refused (exit 305), a plaintext client gets no
  answer, the registered one is online;
- slow: four registered sites run 2 rounds (``flwr run``) with SecAgg+ and DP; one site's
  ledger is exhausted, it refuses, and the rounds go on with the other three (the fewest
  whose sum secure aggregation releases).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client.privacy_ledger import PrivacyLedger
from server.certificate_authority import init_ca
from simulations.loopback_daemons import (
    loopback_environment,
    run_command,
    start_loopback_superlink,
)
from tests.client.site_fixtures import GOOD, make_site
from tests.simulations.loopback_processes import (
    Daemon,
    DaemonGroup,
    free_port,
    is_alive,
    port_is_free,
    wait_for_tls,
    wait_until,
)

BIN = Path(sys.executable).parent
FEDMM, FLWR = str(BIN / "fedmm"), str(BIN / "flwr")
FLWR_SUPERNODE = str(BIN / "flower-supernode")
CONNECTION_REFUSED_EXIT = 305  # flwr ExitCode.SUPERNODE_CONNECTION_ERROR
PROJECT = Path(__file__).resolve().parents[2]


def _run(env: dict[str, str], *argv: object, timeout: float = 120) -> str:
    return run_command(env, *argv, timeout=timeout)


@dataclass
class Coordinator:
    env: dict[str, str]
    ca: Path
    address: str
    port: int
    superlink: Daemon
    group: DaemonGroup
    site_ports: list[int]

    def register(self, public_key: Path, name: str) -> None:
        out = _run(
            self.env, FEDMM, "coordinator", "register-site", public_key,
            "--connection", "coordinator", "--name", name,
        )  # fmt: skip
        assert "registered: node id" in out

    def restart_superlink(self, sig: int) -> None:
        """Stop the SuperLink with ``sig`` and start it again on the same port and
        database (its registrations and runs survive)."""
        self.group.remember_children()  # its SuperExec and ServerApp outlive a SIGKILL
        os.kill(self.superlink.pid, sig)
        assert wait_until(lambda: self.superlink.process.poll() is not None, timeout=90)
        self.superlink = self.group.start(
            f"superlink-{len(self.group.daemons)}",
            [FEDMM, "coordinator", "start-superlink", str(self.ca), "--address", self.address],
        )
        wait_for_tls(self.port, self.ca / "ca.crt", timeout=60, daemon=self.superlink)
        self.group.remember_children()

    def start_site(self, name: str, config: Path, *extra: str) -> Daemon:
        port = free_port()
        self.site_ports.append(port)
        argv = [FEDMM, "site", "start", str(config), "--superlink", self.address]
        argv += ["--ca-cert", str(self.ca / "ca.crt"), "--port", str(port), *extra]
        return self.group.start(name, argv)

    def start_daemon(self, name: str, argv: list[str]) -> Daemon:
        """Any other process, given its own free SuperNode port."""
        port = free_port()
        self.site_ports.append(port)
        return self.group.start(name, [*argv, "--port", str(port)])

    def nodes(self) -> list[dict[str, object]]:
        done = subprocess.run(
            [FLWR, "supernode", "list", "coordinator", "--format", "json"],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        start = done.stdout.find("{")
        if done.returncode != 0 or start < 0:
            return []
        return list(json.loads(done.stdout[start:]).get("nodes", []))

    def online(self) -> int:
        return sum(1 for n in self.nodes() if n.get("status") == "online")


@pytest.fixture()
def coordinator(tmp_path: Path):  # type: ignore[no-untyped-def]
    env = loopback_environment(tmp_path)
    group = DaemonGroup(tmp_path, env)
    state = None
    port = None
    try:
        link = start_loopback_superlink(tmp_path, group)
        ca, address, port, superlink = link.ca, link.address, link.port, link.daemon
        state = Coordinator(env, ca, address, port, superlink, group, [])
        yield state
    finally:
        left = group.stop_all()
        assert left == [], f"processes still alive: {left}"
        assert all(not is_alive(d.pid) for d in group.daemons)
        for used in ([port] if port else []) + (state.site_ports if state else []):
            assert port_is_free(used), f"port {used} still in use"


def _plaintext_request(port: int) -> str:
    """What a client without TLS gets from the SuperLink's port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("POST", "/v1/control/list-nodes", body=b"")
        return f"HTTP {connection.getresponse().status}"
    except (OSError, http.client.HTTPException) as err:
        return f"failed: {type(err).__name__}"
    finally:
        connection.close()


def test_registered_site_connects_and_unregistered_or_plaintext_clients_are_refused(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    assert _plaintext_request(coordinator.port).startswith("failed")
    site_a, site_b = make_site(tmp_path / "site-a"), make_site(tmp_path / "site-b")
    coordinator.register(tmp_path / "site-a" / "keys" / "site-auth-key.pub", "site-a")
    node_a = coordinator.start_site("site-a", site_a)
    node_b = coordinator.start_site("site-b", site_b, "--max-wait-time", "20")

    # Flower's own client without TLS, and one that trusts another CA.
    plain = coordinator.start_daemon(
        "plaintext",
        [FLWR_SUPERNODE, "--insecure", "--superlink", coordinator.address, "--max-wait-time", "8"],
    )
    init_ca(tmp_path / "other-ca")
    other_ca = [
        FLWR_SUPERNODE, "--superlink", coordinator.address, "--root-certificates",
        str(tmp_path / "other-ca" / "ca.crt"), "--max-wait-time", "8",
    ]  # fmt: skip
    wrong_ca = coordinator.start_daemon("wrong-ca", other_ca)

    assert wait_until(lambda: node_b.process.poll() is not None, timeout=60), node_b.output()
    # flwr 1.41 logs exit code 305 but the process (uvicorn around it) ends with 1.
    assert node_b.process.returncode != 0, node_b.output()
    assert f"Exit Code: {CONNECTION_REFUSED_EXIT}" in node_b.output()
    assert "Failed to activate SuperNode" in node_b.output()
    assert wait_until(lambda: coordinator.online() == 1, timeout=60, interval=2), (
        f"{coordinator.nodes()}\n{node_a.output()[-3000:]}"
    )
    assert node_a.process.poll() is None, node_a.output()
    coordinator.group.remember_children()
    for daemon, reason in (
        (plain, "Server disconnected without sending a response"),
        (wrong_ca, "CERTIFICATE_VERIFY_FAILED"),
    ):
        assert wait_until(lambda d=daemon: d.process.poll() is not None, timeout=60)
        assert daemon.process.returncode != 0 and reason in daemon.output(), daemon.output()
        assert f"Exit Code: {CONNECTION_REFUSED_EXIT}" in daemon.output()
    assert coordinator.online() == 1
    # The daemons' files are private (umask 077 before exec): the SuperLink's database.
    assert stat.S_IMODE((coordinator.ca / "superlink-state.db").stat().st_mode) == 0o600


def _write_imagefolder(root: Path, *, offset: int, count: int) -> None:
    """``count`` benchmark records (Fashion-MNIST canvases, captions) as PNG files."""
    from PIL import Image

    from common.data.benchmark import benchmark_train_records

    records = benchmark_train_records(None)
    root.mkdir(parents=True)
    lines = []
    for i in range(offset, offset + count):
        name = f"r{i:05d}.png"
        Image.fromarray(np.asarray(records.images[i])).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": records.captions[i]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _rows(out: Path) -> list[dict[str, object]]:
    metrics = out / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.mark.slow
def test_four_sites_two_rounds_secure_dp_exhausted_site_and_resume_after_coordinator_stop(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """``fedmm coordinator submit`` runs 2 rounds with SecAgg+ and DP on four sites. Sites a,
    b and d train; site c's ledger is already spent past its policy, so it refuses (saying
    why) and each round goes on with the other three (a sum over two would reveal each to
    the other). The SuperLink is killed after round 1's checkpoint and started again;
    ``submit --resume`` stops the orphaned run and finishes round 2 from the checkpoint into
    the same out dir."""
    sites = []
    for index, name in enumerate(("site-a", "site-b", "site-c", "site-d")):
        config = make_site(tmp_path / name, GOOD.replace("min-threshold = 3", "min-threshold = 2"))
        (tmp_path / name / "data" / "metadata.jsonl").unlink()
        (tmp_path / name / "data").rmdir()
        _write_imagefolder(tmp_path / name / "data", offset=200 * index, count=60)
        coordinator.register(tmp_path / name / "keys" / "site-auth-key.pub", name)
        sites.append((name, config))
    spent = PrivacyLedger(noise_multiplier=0.8, delta=1e-6, history=[(0.8, 0.5, 40)], rounds=[9])
    assert spent.epsilon() > 2.0  # the sites' policy: max-epsilon 2
    ledger_c = tmp_path / "site-c" / "state" / "privacy-ledger.json"
    spent.save(ledger_c)
    before = ledger_c.read_bytes()
    daemons = {name: coordinator.start_site(name, config) for name, config in sites}
    assert wait_until(lambda: coordinator.online() == 4, timeout=90, interval=2), (
        coordinator.nodes()
    )
    out = tmp_path / "run"
    submit = [FEDMM, "coordinator", "submit", "--connection", "coordinator", "--out-dir", str(out)]
    for setting in (
        "num-server-rounds=2",
        "min-available-sites=4",
        "min-train-sites=2",
        "epsilon=8.0",
        "batch-size=30",
        "learning-rate=1.0",
        "eval-single-items=200",
        "eval-scenes=100",
        "model-width=16",
        "model-heads=2",
        "secure-aggregation=true",
        "round-timeout=240.0",
        "secagg-stage-timeout=120.0",
    ):
        submit += ["--set", setting]
    first = coordinator.group.start("submit", submit)
    latest = out / "checkpoints" / "latest.json"
    # Four sites: each message starts a fresh ClientApp process at each site, so a round
    # takes minutes on 2 shared cores.
    assert wait_until(lambda: latest.exists() or first.process.poll() is not None, timeout=480), (
        first.output()[-3000:]
    )
    assert json.loads(latest.read_text())["round"] == 1, first.output()[-3000:]
    coordinator.restart_superlink(signal.SIGKILL)  # mid-run: round 2 has started
    assert wait_until(lambda: first.process.poll() is not None, timeout=90)
    assert first.process.returncode == 1 and "--resume" in first.output(), first.output()
    assert len(_rows(out)) == 1
    assert wait_until(lambda: coordinator.online() == 4, timeout=90, interval=2)

    done = subprocess.run(
        [*submit[:7], "--resume"], env=coordinator.env, capture_output=True, text=True, timeout=600
    )
    coordinator.group.remember_children()
    log = done.stdout + done.stderr
    context = f"{log[-4000:]}\n" + "\n".join(d.output()[-2000:] for d in daemons.values())
    assert done.returncode == 0, context
    assert "after round 1" in log, log
    first_id = json.loads((out / "submissions.jsonl").read_text().splitlines()[0])["run_id"]
    listed = _run(
        coordinator.env, FLWR, "ls", "coordinator", "--run-id", first_id, "--format", "json"
    )
    status = json.loads(listed[listed.find("{") :])["runs"][0]["status"]
    # The killed run is over: the resume stopped it, unless the SuperLink already marked it
    # failed (no heartbeat from its ServerApp).
    expected = "finished:stopped" if "stopped the earlier run" in log else "finished:failed"
    assert status == expected, (status, log)
    rows = _rows(out)
    assert [row["round"] for row in rows] == [1, 2], context
    for row in rows:
        assert not row.get("aborted"), row
        assert (row["sites_trained"], row["sites_refused"], row["sites_failed"]) == (3, 1, 0), row
        assert row["epsilon_bound_max"] == 2.0, row  # the sites' own budget, not the run's 8
        assert set(row["secagg_stage_s"]) >= {"train.secagg_setup", "train.secagg_unmask"}
    for name in ("model.safetensors", "summary.json", "report.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    runs = [json.loads(x) for x in (out / "submissions.jsonl").read_text().splitlines()]
    assert [run["resume"] for run in runs] == [False, True]
    assert "privacy budget" in daemons["site-c"].output()
    assert ledger_c.read_bytes() == before
    for name, config in [site for site in sites if site[0] != "site-c"]:
        status = json.loads(_run(coordinator.env, FEDMM, "site", "status", config, "--json"))
        assert status["rounds"] == [2], (name, status)  # the resumed run's rounds
        assert status["accountant_entries"] >= 1 and status["dp_sgd_steps"] > 0, status
        assert 0 < status["epsilon_spent"] <= 2.0


def test_loading_the_clientapp_as_flower_does_imports_no_torch() -> None:
    """A SuperNode starts ``flwr-clientapp`` for every message, which loads ``client.app:app``
    through Flower's loader: only the training handler may import torch (and opacus), so
    the SecAgg+ stages after setup start without it (the whole round without torch:
    ``tests/server/test_secure_aggregation_wiring.py``)."""
    code = (
        "import sys\n"
        "import flwr.supernode.cli.flwr_clientapp\n"
        "from flwr.clientapp.client_app import LoadClientAppError\n"
        "from flwr.supercore.object_ref import load_app\n"
        "app = load_app('client.app:app', LoadClientAppError, '.')\n"
        "print(type(app).__name__, sorted(m for m in ('torch', 'opacus') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "ClientApp []", done.stdout
