"""Real Flower daemons on loopback for the deployment tests and benchmark: free ports,
started processes with their logs, and cleanup by PID (the process and every descendant it
started, including Flower's helpers that leave its process tree: ``orphans_of``; the process
tree itself is ``common.process_supervision``'s)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmm.common.flower_commands import flower_environment
from fedmm.common.process_supervision import descendants, is_running

FEDMM = str(Path(sys.executable).parent / "fedmm")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (a server could bind it now)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def orphans_of(pids: set[int]) -> set[int]:
    """Processes started with ``--parent-pid P`` for a P in ``pids``: Flower's SuperExec
    runs in its own session and outlives a SuperNode that exits by itself (for a few
    seconds, until its parent monitor notices), reparented away from it."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            if flag == b"--parent-pid" and value.isdigit() and int(value) in pids:
                found.add(int(entry.name))
    return found


@dataclass
class Daemon:
    """One started process and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class DaemonGroup:
    """Every process a test started; :meth:`stop_all` ends them and their children by PID."""

    directory: Path
    env: dict[str, str]
    daemons: list[Daemon] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    def start(self, name: str, argv: list[str]) -> Daemon:
        log = self.directory / f"{name}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.directory
            )
        daemon = Daemon(name, process, log)
        self.daemons.append(daemon)
        return daemon

    def remember_children(self) -> None:
        """Note every descendant now: one that outlives its parent is reparented, and
        could not be found from the parent's PID later."""
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                self.seen.update(descendants(daemon.pid))

    def stop_all(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM, then SIGKILL after ``timeout``; returns the PIDs still alive (none)."""
        self.remember_children()
        known = {d.pid for d in self.daemons} | self.seen
        while extra := orphans_of(known) - known:
            known |= extra
            for pid in extra:
                self.seen.update(descendants(pid))
            known |= self.seen
        self.seen |= known - {d.pid for d in self.daemons}
        pids = [d.pid for d in self.daemons if d.process.poll() is None] + sorted(self.seen)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(is_running(p) for p in pids):
            for daemon in self.daemons:
                daemon.process.poll()
            time.sleep(0.2)
        for pid in pids:
            if is_running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for daemon in self.daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.process.wait(timeout=5)
        time.sleep(0.2)
        return [pid for pid in pids if is_running(pid)]


def wait_for_tls(port: int, ca_file: Path, *, timeout: float, daemon: Daemon) -> None:
    """Until a TLS handshake with 127.0.0.1:port verifies against ``ca_file``."""
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"{daemon.name} exited early:\n{daemon.output()[-3000:]}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{daemon.name} did not serve TLS in {timeout} s:\n{daemon.output()}")


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.5) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def run_command(env: dict[str, str], *argv: object, timeout: float = 300.0) -> str:
    """Run ``argv`` to completion; its stdout, or ``RuntimeError`` with the exit code and
    both outputs."""
    done = subprocess.run(
        [*map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def loopback_environment(directory: Path) -> dict[str, str]:
    """The environment of a loopback deployment: its own ``FLWR_HOME`` in ``directory``,
    runtime dependency installation and telemetry off."""
    return flower_environment(
        {
            "FLWR_HOME": str(directory / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
    )


@dataclass
class LoopbackSuperLink:
    """A SuperLink with TLS and SuperNode authentication on ``127.0.0.1:control_port`` (its
    Control API, for ``flwr``), behind the Fleet proxy on ``127.0.0.1:port`` (the sites')."""

    ca: Path
    address: str  # where sites connect: the proxy
    port: int
    daemon: Daemon  # the supervisor (fedmm coordinator start-superlink)
    control_address: str
    control_port: int


def start_loopback_superlink(directory: Path, group: DaemonGroup) -> LoopbackSuperLink:
    """Through the ``fedmm coordinator`` commands: a CA in ``directory/ca``, the SuperLink's
    certificate, the SuperLink and its Fleet proxy (in ``group``, both serving TLS), and
    the connection ``coordinator`` to the SuperLink's own address in ``group.env``'s
    ``FLWR_HOME``."""
    env, ca = group.env, directory / "ca"
    port, control_port = free_port(), free_port()
    address, control = f"127.0.0.1:{port}", f"127.0.0.1:{control_port}"
    run_command(env, FEDMM, "coordinator", "init-ca", ca)
    run_command(env, FEDMM, "coordinator", "issue-cert", ca, "--san", "127.0.0.1")
    daemon = group.start(
        "superlink",
        [FEDMM, "coordinator", "start-superlink", str(ca), "--address", control,
         "--public-address", address],
    )  # fmt: skip
    wait_for_tls(control_port, ca / "ca.crt", timeout=60, daemon=daemon)
    wait_for_tls(port, ca / "ca.crt", timeout=30, daemon=daemon)
    group.remember_children()
    run_command(env, FEDMM, "coordinator", "add-connection", "coordinator", "--address", control,
                "--ca-cert", ca / "ca.crt")  # fmt: skip
    return LoopbackSuperLink(ca, address, port, daemon, control, control_port)
