"""Deployment off loopback: the coordinator and two sites on hosts of their own (network
namespaces this test creates, joined by veth pairs on a bridge in the coordinator's
namespace, with documentation addresses 198.51.100.0/24 that exist only inside them).

The SuperLink's certificate names the coordinator's address; sites verify it over the
bridge, authenticate with their keys through the nginx proxy, and come online. From a
site's host the Control API is out of reach: through the proxy it is refused (403), and the
SuperLink's own port listens on the coordinator's loopback only (connection refused). The
operator's ``flwr`` on the coordinator's host works. Processes are stopped by PID and the
namespaces removed, also when the test fails. Slow (about a minute); needs root and
``ip netns``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmm.simulations.loopback_daemons import (
    DaemonGroup,
    free_port,
    loopback_environment,
    run_command,
    wait_until,
)
from tests.client.site_fixtures import make_site

BIN = Path(sys.executable).parent
FEDMM, FLWR = str(BIN / "fedmm"), str(BIN / "flwr")
SUBNET = "198.51.100"  # TEST-NET-2: documentation addresses, only inside these namespaces
COORDINATOR_IP = f"{SUBNET}.1"

pytestmark = pytest.mark.slow


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Hosts:
    """The namespaces: ``coordinator`` and ``sites`` (names), and how to run in one."""

    coordinator: str
    sites: list[str]

    @staticmethod
    def inside(namespace: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]


@pytest.fixture()
def hosts() -> Iterator[Hosts]:
    if shutil.which("ip") is None:
        pytest.fail("`ip` (iproute2) is missing: `bash .ci/setup` installs it")
    prefix = f"fedmm-{uuid.uuid4().hex[:8]}"
    made: list[str] = []
    try:
        coordinator = f"{prefix}-coord"
        _ip("netns", "add", coordinator)
        made.append(coordinator)
        _ip("-n", coordinator, "link", "set", "lo", "up")
        _ip("-n", coordinator, "link", "add", "br0", "type", "bridge")
        _ip("-n", coordinator, "addr", "add", f"{COORDINATOR_IP}/24", "dev", "br0")
        _ip("-n", coordinator, "link", "set", "br0", "up")
        sites = []
        for index in (1, 2):
            site = f"{prefix}-site{index}"
            _ip("netns", "add", site)
            made.append(site)
            _ip("-n", site, "link", "set", "lo", "up")
            _ip("link", "add", "eth0", "netns", site, "type", "veth",
                "peer", "name", f"site{index}", "netns", coordinator)  # fmt: skip
            _ip("-n", coordinator, "link", "set", f"site{index}", "master", "br0", "up")
            _ip("-n", site, "addr", "add", f"{SUBNET}.{10 + index}/24", "dev", "eth0")
            _ip("-n", site, "link", "set", "eth0", "up")
            sites.append(site)
        yield Hosts(coordinator, sites)
    finally:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in listed, listed


def _tcp_probe(port: int) -> str:
    """Python code that exits 0 when something accepts TCP connections on 127.0.0.1:port."""
    return f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"


def _tls_probe(address: str, port: int, ca: Path) -> str:
    """Python code that handshakes with ``address:port``, verifying the certificate's
    name for that address against ``ca``."""
    return (
        "import socket, ssl\n"
        f"c = ssl.create_default_context(cafile={str(ca)!r})\n"
        f"with socket.create_connection(({address!r}, {port}), timeout=3) as s:\n"
        f"    c.wrap_socket(s, server_hostname={address!r}).close()\n"
    )


def test_sites_on_other_hosts_connect_through_the_proxy_and_cannot_reach_control(
    hosts: Hosts, tmp_path: Path
) -> None:
    env = loopback_environment(tmp_path)
    group = DaemonGroup(tmp_path, env)
    coord = hosts.coordinator
    ca, public, control = tmp_path / "ca", free_port(), free_port()

    def on_coordinator(*argv: object) -> str:
        return run_command(env, *Hosts.inside(coord, [str(a) for a in argv]))

    try:
        run_command(env, FEDMM, "coordinator", "init-ca", ca)
        run_command(env, FEDMM, "coordinator", "issue-cert", ca, "--san", COORDINATOR_IP)
        supervisor = group.start(
            "superlink",
            Hosts.inside(coord, [FEDMM, "coordinator", "start-superlink", str(ca),
                                 "--address", f"127.0.0.1:{control}",
                                 "--public-address", f"{COORDINATOR_IP}:{public}"]),
        )  # fmt: skip
        probe = [sys.executable, "-c", _tls_probe(COORDINATOR_IP, public, ca / "ca.crt")]
        site_probe = Hosts.inside(hosts.sites[0], probe)
        assert wait_until(
            lambda: subprocess.run(site_probe, capture_output=True).returncode == 0, timeout=90
        ), supervisor.output()[-3000:]
        # The proxy answers TLS as soon as nginx runs; the SuperLink's control API behind
        # it may still be starting (a loaded machine): wait for it before registering.
        control_probe = Hosts.inside(coord, [sys.executable, "-c", _tcp_probe(control)])
        assert wait_until(
            lambda: subprocess.run(control_probe, capture_output=True).returncode == 0,
            timeout=90,
        ), supervisor.output()[-3000:]
        on_coordinator(FEDMM, "coordinator", "add-connection", "coordinator",
                       "--address", f"127.0.0.1:{control}", "--ca-cert", ca / "ca.crt")  # fmt: skip
        daemons = []
        for index, site in enumerate(hosts.sites, start=1):
            name = f"site-{index}"
            config = make_site(tmp_path / name)
            on_coordinator(FEDMM, "coordinator", "register-site",
                           tmp_path / name / "keys" / "site-auth-key.pub",
                           "--connection", "coordinator", "--name", name)  # fmt: skip
            start = [FEDMM, "site", "start", str(config), "--superlink",
                     f"{COORDINATOR_IP}:{public}", "--ca-cert", str(ca / "ca.crt"),
                     "--port", str(free_port())]  # fmt: skip
            daemons.append(group.start(name, Hosts.inside(site, start)))

        def online() -> int:
            listed = on_coordinator(FLWR, "supernode", "list", "coordinator", "--format", "json")
            nodes = json.loads(listed[listed.find("{") :])["nodes"]
            return sum(node["status"] == "online" for node in nodes)

        assert wait_until(lambda: online() == 2, timeout=120, interval=3), "\n".join(
            d.output()[-2000:] for d in daemons
        )

        # From a site's host: the Control API through the proxy is refused, and the
        # SuperLink's own port is not reachable at all (it listens on loopback).
        site = hosts.sites[1]
        for port, expected in ((public, "403 Forbidden"), (control, "ConnectionRefusedError")):
            attempt = subprocess.run(
                Hosts.inside(site, [sys.executable, "-c", _control_request(port, ca)]),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert expected in attempt.stdout + attempt.stderr, (port, attempt)
        listed = on_coordinator(FLWR, "ls", "coordinator", "--format", "json")
        assert json.loads(listed[listed.find("{") :])["success"] is True
    finally:
        left = group.stop_all()
        assert left == [], f"processes still alive: {left}"


def _control_request(port: int, ca: Path) -> str:
    """Python code that asks the Control API at the coordinator's address for its nodes."""
    return (
        "import http.client, ssl\n"
        f"c = ssl.create_default_context(cafile={str(ca / 'ca.crt')!r})\n"
        f"h = http.client.HTTPSConnection({COORDINATOR_IP!r}, {port}, timeout=5, context=c)\n"
        "try:\n"
        "    h.request('POST', '/v1/control/list-nodes', body=b'')\n"
        "    r = h.getresponse()\n"
        "    print(r.status, r.reason)\n"
        "except OSError as err:\n"
        "    print('failed:', type(err).__name__, err)\n"
    )
