"""Deployment on loopback with real Flower daemons, started through the ``fedmm`` commands:
a SuperLink with TLS and SuperNode authentication behind its Fleet-only nginx proxy, and
sites (``fedmm site start``: a SuperNode with ``--isolation process`` and the site's own
runner). Every process started is stopped by PID, and its ports are free after.

- default: the unregistered site is refused (exit 305) and gives up after its retry window,
  plaintext clients get no answer, the registered one is online; at the public port the
  Control API is refused (``flwr supernode register``, ``flwr ls``, ``flwr run``) while the
  operator's ``flwr`` on loopback works;
- slow: a tampered app (same name and version) is refused by every site before any of it
  runs, and a site's exception reaches the coordinator as a code only;
- slow: a SuperNode killed at a site is started again by ``fedmm site start`` until the
  SuperLink takes it back;
- slow: four registered sites run 2 rounds (``flwr run``) with SecAgg+ and DP; one site's
  ledger is exhausted, it refuses, and the rounds go on with the other three (the fewest
  whose sum secure aggregation releases); the SuperLink
  is killed mid-run, its supervisor stops the orphaned ServerApp and starts it again, and
  ``submit --resume`` finishes the run.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedmm.client.privacy_ledger import PrivacyLedger
from fedmm.client.site_audit import certificate_sha256, read_audit_log
from fedmm.client.site_keys import generate_site_key_pair
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.process_supervision import command_name, descendants, is_running
from fedmm.server.certificate_authority import init_ca
from fedmm.simulations.loopback_daemons import (
    Daemon,
    DaemonGroup,
    free_port,
    loopback_environment,
    port_is_free,
    run_command,
    start_loopback_superlink,
    wait_for_tls,
    wait_until,
)
from tests.client.site_fixtures import GOOD, make_site, small_colour_drawings

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
    address: str  # the public (proxy) address sites use
    port: int
    control_port: int  # the SuperLink's own port on loopback (flwr)
    superlink: Daemon  # the supervisor: fedmm coordinator start-superlink
    group: DaemonGroup
    site_ports: list[int]

    def register(self, public_key: Path, name: str) -> None:
        out = _run(
            self.env, FEDMM, "coordinator", "register-site", public_key,
            "--connection", "coordinator", "--name", name,
        )  # fmt: skip
        assert "registered: node id" in out

    def kill_superlink(self) -> int:
        """SIGKILL the SuperLink under its supervisor (a crash); its PID."""
        self.group.remember_children()
        pid = daemon_child(self.superlink, "flower-superlink")
        os.kill(pid, signal.SIGKILL)
        return pid

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
        state = Coordinator(
            env, link.ca, link.address, link.port, link.control_port, link.daemon, group, []
        )
        port = link.port
        yield state
    finally:
        left = group.stop_all()
        assert left == [], f"processes still alive: {left}"
        assert all(not is_running(d.pid) for d in group.daemons)
        ports = [port, state.control_port] if state else []
        for used in ports + (state.site_ports if state else []):
            assert port_is_free(used), f"port {used} still in use"


def daemon_child(daemon: Daemon, name: str) -> int:
    """The PID of the process called ``name`` below ``daemon`` (one must exist)."""
    found = [pid for pid in descendants(daemon.pid) if command_name(pid) == name]
    assert found, f"no {name} below {daemon.name}:\n{daemon.output()[-2000:]}"
    return found[0]


def _plaintext_request(port: int) -> str:
    """What a client without TLS gets from a port."""
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
    assert _plaintext_request(coordinator.control_port).startswith("failed")
    assert _plaintext_request(coordinator.port) == "HTTP 400"  # nginx: not TLS, not forwarded
    site_a, site_b = make_site(tmp_path / "site-a"), make_site(tmp_path / "site-b")
    coordinator.register(tmp_path / "site-a" / "keys" / "site-auth-key.pub", "site-a")
    node_a = coordinator.start_site("site-a", site_a)
    # A window long enough for one retry even when a SuperNode start takes seconds (loaded
    # machine): the first retry comes 5 s after the first refusal.
    node_b = coordinator.start_site("site-b", site_b, "--max-wait-time", "30")

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

    assert wait_until(lambda: node_b.process.poll() is not None, timeout=240), node_b.output()
    # flwr 1.41 logs exit code 305 but the process (uvicorn around it) ends with 1; the
    # site retried for its --max-wait-time, saying why, then gave up.
    assert node_b.process.returncode == 1, node_b.output()
    assert f"Exit Code: {CONNECTION_REFUSED_EXIT}" in node_b.output()
    assert "Failed to activate SuperNode" in node_b.output()
    assert "starting the SuperNode again" in node_b.output()
    assert "its key is not registered" in node_b.output()
    assert "not retrying" in node_b.output()
    assert wait_until(lambda: coordinator.online() == 1, timeout=60, interval=2), (
        f"{coordinator.nodes()}\n{node_a.output()[-3000:]}"
    )
    assert node_a.process.poll() is None, node_a.output()
    coordinator.group.remember_children()
    for daemon, reason in (
        (plain, "400 Bad Request"),  # nginx: plain HTTP on its TLS port
        (wrong_ca, "CERTIFICATE_VERIFY_FAILED"),
    ):
        assert wait_until(lambda d=daemon: d.process.poll() is not None, timeout=60)
        assert daemon.process.returncode != 0 and reason in daemon.output(), daemon.output()
        assert f"Exit Code: {CONNECTION_REFUSED_EXIT}" in daemon.output()
    assert coordinator.online() == 1
    # The daemons' files are private (umask 077 before exec): the SuperLink's database.
    assert stat.S_IMODE((coordinator.ca / "superlink-state.db").stat().st_mode) == 0o600


def _https_status(port: int, ca: Path, method: str, path: str) -> int:
    """The HTTP status a TLS client that trusts ``ca`` gets for ``method path``."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_control_api_is_refused_at_the_public_port_and_works_on_loopback(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """Everyone who reaches the public port (every site has the CA certificate) is refused
    the Control and Runtime APIs: no key registered, no run submitted, no run listed. The
    operator's ``flwr`` on the coordinator machine reaches the SuperLink on loopback."""
    env, ca = coordinator.env, coordinator.ca / "ca.crt"
    _run(env, FEDMM, "coordinator", "add-connection", "public", "--address", coordinator.address,
         "--ca-cert", ca)  # fmt: skip
    intruder = generate_site_key_pair(tmp_path / "intruder")
    attempts = {
        "register": [FLWR, "supernode", "register", str(intruder.public_key), "public"],
        "list nodes": [FLWR, "supernode", "list", "public", "--format", "json"],
        "list runs": [FLWR, "ls", "public", "--format", "json"],
        "run": [FLWR, "run", str(PROJECT), "public"],
    }
    for what, argv in attempts.items():
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
        said = done.stdout + done.stderr
        failed = done.returncode != 0 or '"success": false' in said  # --format json: exit 0
        assert failed and "403 Forbidden" in said, (what, said)
    assert coordinator.nodes() == []  # on loopback: nothing was registered
    listed = _run(env, FLWR, "ls", "coordinator", "--format", "json")
    assert json.loads(listed[listed.find("{") :])["runs"] == []  # and nothing submitted
    port = coordinator.port
    for path in (
        "/v1/control/list-nodes",
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/v1/fleet/register-node",  # self-registration: only for SuperNodes without a key
        "/v1/fleet/../control/list-nodes",
        "/v1/fleet/get-run/../../control/list-nodes",
        "/",
    ):
        assert _https_status(port, ca, "POST", path) == 403, path
    assert _https_status(port, ca, "GET", "/v1/fleet/get-run") == 403
    # A Fleet call is forwarded: the SuperLink itself answers (unauthenticated: not 200).
    assert _https_status(port, ca, "POST", "/v1/fleet/get-run") not in (200, 403)
    assert _https_status(coordinator.control_port, ca, "POST", "/v1/control/list-nodes") != 403


def _write_imagefolder(root: Path, *, offset: int, count: int) -> None:
    """``count`` benchmark records (Fashion-MNIST canvases, captions) as PNG files."""
    from PIL import Image

    from fedmm.common.data.benchmark import benchmark_train_records

    records = benchmark_train_records(None)
    root.mkdir(parents=True)
    lines = []
    for i in range(offset, offset + count):
        name = f"r{i:05d}.png"
        Image.fromarray(np.asarray(records.images[i])).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": records.captions[i]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _write_colour_imagefolder(root: Path, drawings: list[Path]) -> None:
    """The drawings as a site's imagefolder; each caption names a colour (the run's word
    list swaps it for the distractors) and the drawing, so no two captions are equal."""
    import shutil

    colours = ("red", "green", "blue", "yellow", "orange", "pink", "brown")
    root.mkdir(parents=True)
    lines = []
    for i, path in enumerate(drawings):
        name = f"d{i:03d}.png"
        shutil.copyfile(path, root / name)
        text = f"a {colours[i % len(colours)]} drawing of {path.stem.replace('_', ' ')}"
        lines.append(json.dumps({"file_name": name, "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _rows(out: Path) -> list[dict[str, object]]:
    metrics = out / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []


def _tampered_release(directory: Path, *, marker: Path, victim: Path) -> Path:
    """A copy of the installed release (same name and version) whose ClientApp, once
    imported, reads a site's metadata and writes it out to ``marker``."""
    from fedmm.common.release_identity import release_directory, release_files

    source, target = release_directory(), directory / "fedmm"
    for name in [*release_files(source), ".gitignore"]:
        origin = source / name
        if name == "pyproject.toml" or origin.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(origin.read_bytes())
    app = target / "client" / "app.py"
    exfiltrate = (
        f"\nimport pathlib as _p\n_p.Path({str(marker)!r}).write_bytes("
        f"_p.Path({str(victim)!r}).read_bytes())\n"
    )
    app.write_text(app.read_text() + exfiltrate)
    return target


SMALL_RUN = (
    "num-server-rounds=1",
    "min-available-sites=2",
    "min-train-sites=2",
    "epsilon=8.0",
    "batch-size=30",
    "learning-rate=1.0",
    "eval-single-items=100",
    "eval-scenes=50",
    "model-width=16",
    "model-heads=2",
    "round-timeout=240.0",
    "secagg-stage-timeout=120.0",
)


@pytest.mark.slow
def test_sites_refuse_a_tampered_app_and_send_codes_not_error_text(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """A run whose app is not the sites' pinned release (same name and version, a ClientApp
    that would copy a site's metadata out) is refused by every site before any of it runs:
    no copy is made, no record is read (no de-identification cache), no ledger is written,
    and the coordinator gets the code ``untrusted-app``. The genuine release then runs
    (site-a trains: its ledger spends, and plain FedAvg takes its update), and site-b,
    whose data vanished, fails with an exception whose text, naming its files, stays in its
    own log: the coordinator gets ``site-error``. The tampered run trained no round:
    ``submit`` says so and exits 3."""
    sites = {}
    for index, name in enumerate(("site-a", "site-b")):
        config = make_site(tmp_path / name)
        (tmp_path / name / "data" / "metadata.jsonl").unlink()
        (tmp_path / name / "data").rmdir()
        _write_imagefolder(tmp_path / name / "data", offset=100 * index, count=40)
        coordinator.register(tmp_path / name / "keys" / "site-auth-key.pub", name)
        sites[name] = coordinator.start_site(name, config)
    assert wait_until(lambda: coordinator.online() == 2, timeout=120, interval=2), (
        coordinator.nodes()
    )
    marker = tmp_path / "exfiltrated.jsonl"
    tampered = _tampered_release(
        tmp_path / "tampered", marker=marker, victim=tmp_path / "site-a" / "data" / "metadata.jsonl"
    )
    # Plain FedAvg: two sites are fewer than any secure sum may cover, and what is tested
    # here (which code runs at a site, what reaches the coordinator) is the same either way.
    submit = [FEDMM, "coordinator", "submit", "--connection", "coordinator"]
    for setting in [*SMALL_RUN, "secure-aggregation=false"]:
        submit += ["--set", setting]
    done = subprocess.run(
        [*submit, "--out-dir", str(tmp_path / "tampered-run"), "--app", str(tampered)],
        env=coordinator.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    coordinator.group.remember_children()
    log = done.stdout + done.stderr
    assert done.returncode == 3, log[-4000:]
    assert "sites trained in 0 of the 1 rounds" in log, log[-4000:]
    assert "(site-a) refused round 1: untrusted-app" in log, log[-4000:]
    assert "(site-b) refused round 1: untrusted-app" in log, log[-4000:]
    assert not (tmp_path / "tampered-run" / "model.safetensors").exists()
    assert not marker.exists()  # the tampered code never ran at a site
    for name, daemon in sites.items():
        assert "refused run" in daemon.output() and "untrusted-app" in daemon.output()
        assert not (tmp_path / name / "cache").exists()  # no record was read
        assert not (tmp_path / name / "state" / "privacy-ledger.json").exists()

    (tmp_path / "site-b" / "data" / "metadata.jsonl").unlink()
    genuine = tmp_path / "genuine-run"
    done = subprocess.run(
        [*submit, "--out-dir", str(genuine)],
        env=coordinator.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    coordinator.group.remember_children()
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "(site-b) failed round 1: error code 2: site-error" in log, log[-4000:]
    assert str(tmp_path / "site-b") not in log  # the site's paths stay at the site
    assert "Traceback" in sites["site-b"].output()
    assert str(tmp_path / "site-b" / "data") in sites["site-b"].output()
    spent = PrivacyLedger.load(tmp_path / "site-a" / "state" / "privacy-ledger.json")
    assert spent.rounds == [1] and spent.history, "site-a ran the genuine release and trained"
    assert not marker.exists()

    # Each site's audit log: the tampered run refused, the genuine run served (site-a) or
    # failed (site-b), each naming the coordinator and the certificate the site trusts.
    fingerprint = certificate_sha256(coordinator.ca / "ca.crt")
    audits = {
        name: read_audit_log(tmp_path / name / "state" / "site-audit.jsonl").events
        for name in sites
    }
    for name, events in audits.items():
        assert events[0]["code"] == "untrusted-app", (name, events)
        assert all(e["coordinator_address"] == coordinator.address for e in events)
        assert all(e["coordinator_certificate_sha256"] == fingerprint for e in events)
    (served,) = [e for e in audits["site-a"] if e.get("task") == "local_dp_sgd"]
    assert served["round"] == 1 and served["records_used"] + served["records_held_out"] == 40
    assert 0 < served["epsilon_run"] <= served["epsilon_lifetime"]
    assert ("train", "site-error") in [
        (e.get("message_type"), e.get("code")) for e in audits["site-b"]
    ]


@pytest.mark.slow
def test_a_killed_supernode_is_started_again_until_the_superlink_takes_it_back(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """A SuperNode that dies without deactivating is refused by the SuperLink (code 2004)
    for as long as the SuperLink keeps its old session; ``fedmm site start`` says why,
    starts it again with growing delays, and the site comes back online."""
    config = make_site(tmp_path / "site-a")
    coordinator.register(tmp_path / "site-a" / "keys" / "site-auth-key.pub", "site-a")
    site = coordinator.start_site("site-a", config)
    assert wait_until(lambda: coordinator.online() == 1, timeout=120, interval=2), site.output()
    coordinator.group.remember_children()
    supernode = daemon_child(site, "fedmm-supernode")
    os.kill(supernode, signal.SIGKILL)
    assert wait_until(lambda: "starting the SuperNode again" in site.output(), timeout=60)
    assert wait_until(lambda: site.output().count("SuperNode ID:") >= 2, timeout=300, interval=2), (
        site.output()[-3000:]
    )
    coordinator.group.remember_children()
    assert not is_running(supernode) and site.process.poll() is None
    assert wait_until(lambda: coordinator.online() == 1, timeout=60, interval=2)


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
    serverapp = daemon_child(coordinator.superlink, "flwr-serverapp")
    killed = coordinator.kill_superlink()  # mid-run: round 2 has started
    # The supervisor stops what the dead SuperLink left (its ServerApp would otherwise wait
    # on a SuperLink that is gone) and starts the SuperLink again.
    assert wait_until(lambda: "starting it again" in coordinator.superlink.output(), timeout=90)
    assert not is_running(killed) and not is_running(serverapp), coordinator.superlink.output()
    assert "flwr-serverapp" in coordinator.superlink.output()
    ca_file = coordinator.ca / "ca.crt"
    wait_for_tls(coordinator.control_port, ca_file, timeout=90, daemon=coordinator.superlink)
    coordinator.group.remember_children()
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
    assert "lifetime privacy budget" in daemons["site-c"].output()
    # Sites by their registered names, in the coordinator's log and report.
    # Its ledger was spent by an earlier run: the site's own lifetime cap refuses, not the
    # run's budget.
    assert "(site-c) refused round 2: lifetime-budget" in log, log
    names = json.loads((out / "sites.json").read_text())
    assert sorted(names.values()) == ["site-a", "site-b", "site-c", "site-d"]
    assert "| site-c |" in (out / "report.md").read_text()
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
        "app = load_app('fedmm.client.app:app', LoadClientAppError, '.')\n"
        "print(type(app).__name__, sorted(m for m in ('torch', 'opacus') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "ClientApp []", done.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)
def test_colour_sites_train_and_evaluate_on_their_own_held_out_records(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """Three sites whose imagefolders hold colour drawings (OpenClipart, most with
    transparency, composited on white at the site) train a round at 32x32 RGB under SecAgg+
    and DP, then evaluate the global model on their own held-out
    records: ``metrics.jsonl`` has the federation's ``federated_eval`` (counts summed under
    SecAgg+ over the three sites) and no benchmark accuracy, since the coordinator's
    Fashion-MNIST evaluation is for 28x56 grey images only."""
    drawings = small_colour_drawings(90, modes=("RGB", "RGBA"))
    sites = []
    for index, name in enumerate(("site-a", "site-b", "site-c")):
        config = make_site(tmp_path / name, GOOD.replace("min-threshold = 3", "min-threshold = 2"))
        (tmp_path / name / "data" / "metadata.jsonl").unlink()
        (tmp_path / name / "data").rmdir()
        _write_colour_imagefolder(tmp_path / name / "data", drawings[30 * index : 30 * index + 30])
        coordinator.register(tmp_path / name / "keys" / "site-auth-key.pub", name)
        sites.append((name, config))
    daemons = {name: coordinator.start_site(name, config) for name, config in sites}
    assert wait_until(lambda: coordinator.online() == 3, timeout=120, interval=2), (
        coordinator.nodes()
    )
    # The run's public caption bank (it travels in the requests, checked by its SHA-256).
    bank = tmp_path / "caption-bank.txt"
    things = ("house", "tree", "car", "cat", "flower", "boat", "star", "bird", "cup", "hat")
    bank.write_text("".join(f"a drawing of a {a} next to a {b}\n" for a in things for b in things))
    out = tmp_path / "run"
    submit = [FEDMM, "coordinator", "submit", "--connection", "coordinator", "--out-dir", str(out)]
    for setting in (
        "num-server-rounds=1",
        "min-available-sites=3",
        "min-train-sites=3",
        f"caption-bank={bank}",
        "model-vocab-buckets=4096",
        "epsilon=8.0",
        "batch-size=10",
        "learning-rate=1.0",
        "model-width=16",
        "model-heads=2",
        "image-size=32x32",
        "image-channels=3",
        "model-patch-size=8",
        "distractor-word-lists=colours",
        "eval-every=1",
        "round-timeout=240.0",
        "secagg-stage-timeout=120.0",
    ):
        submit += ["--set", setting]
    done = subprocess.run(submit, env=coordinator.env, capture_output=True, text=True, timeout=900)
    coordinator.group.remember_children()
    log = done.stdout + done.stderr
    context = f"{log[-4000:]}\n" + "\n".join(d.output()[-2000:] for d in daemons.values())
    assert done.returncode == 0, context
    [row] = _rows(out)
    assert row["sites_trained"] == 3 and not row.get("aborted"), row
    assert "accuracy" not in row, row  # no Fashion-MNIST evaluation of a colour model
    evaluation = row["federated_eval"]
    assert evaluation["sites_evaluated"] == 3, evaluation
    assert 3 <= evaluation["records"] <= 90 * 0.5, evaluation  # held out: about a fifth
    for key in ("r_at_1_i2t", "r_at_10_i2t", "r_at_10_t2i", "r_at_10_i2t_shuffled"):
        assert 0.0 <= evaluation[key] <= 1.0, (key, evaluation)
    assert 0.0 < evaluation["chance_r_at_10"] <= 1.0, evaluation
    config = json.loads((out / "model-config.json").read_text())
    assert (config["image_height"], config["image_width"], config["image_channels"]) == (32, 32, 3)
