"""``fedmm site start``: the site's SuperNode and executor, kept running and cleaned up.

One process supervises the site:

- ``flower-supernode --isolation process`` connects out to the coordinator and queues each
  message as a task; it runs no app itself;
- :class:`client.site_executor.SiteTaskExecutor` (a thread here) claims the tasks and runs
  the installed release's ClientApp in a site runner per task, refusing any other app;
- when the SuperNode stops by itself, everything it and the runners left is stopped, and
  the SuperNode is started again after a growing delay (5, 10, 20, 30, 30... s), saying
  why, until ``retry_for`` seconds passed without it getting connected. A SuperLink that
  refuses activation (``[code: 2004]``) does so both for a key it does not know and, for
  about a minute, for a site whose previous SuperNode stopped without deactivating (killed,
  or the machine died): the retries ride that out. A certificate the site cannot verify is
  not retried: that needs a fix;
- on SIGTERM or SIGINT the SuperNode is stopped first (it deactivates itself at the
  SuperLink, so a restart is accepted at once), then every process started from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedmm.client.release_pin import ReleasePin
from fedmm.client.site_executor import SiteTaskExecutor
from fedmm.common.process_supervision import (
    become_subreaper,
    command_name,
    descendants,
    reap_orphans,
    start_child,
    stop_descendants,
    stop_processes,
)

#: How long refusals and crashes are retried when the site gives no ``--max-wait-time``:
#: well past the minute a SuperLink keeps a vanished SuperNode's session.
DEFAULT_RETRY_SECONDS = 300.0
REFUSED = ("[code: 2004]", "Failed to activate SuperNode")
UNTRUSTED_CERTIFICATE = "CERTIFICATE_VERIFY_FAILED"
CONNECTED = "SuperNode ID:"
BACKOFF_SECONDS = (5.0, 10.0, 20.0, 30.0)


def _say(text: str) -> None:
    print(f"fedmm site start: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SiteService:
    """What ``fedmm site start`` runs."""

    supernode_argv: list[str]
    env: Mapping[str, str]
    runtime_api_address: str
    pin: ReleasePin
    cwd: Path
    retry_for: float = DEFAULT_RETRY_SECONDS
    poll_interval: float = 0.25


@dataclass
class SuperNodeOutput:
    """Copies the SuperNode's output to ours and notes what it said."""

    stream: IO[bytes]
    refused: bool = False
    untrusted_certificate: bool = False
    connected: bool = False
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            self.refused |= any(marker in line for marker in REFUSED)
            self.untrusted_certificate |= UNTRUSTED_CERTIFICATE in line
            self.connected |= CONNECTED in line


def exit_reason(output: SuperNodeOutput, returncode: int) -> tuple[str, bool]:
    """Why the SuperNode stopped, and whether starting it again can help."""
    if output.untrusted_certificate:
        return (
            "the SuperLink's certificate does not verify against --ca-cert (wrong CA, or an "
            "address the certificate does not name): fix the CA file or the address",
            False,
        )
    if output.refused:
        return (
            "the SuperLink refused this site (code 2004): either its key is not registered "
            "(check the fingerprint with the coordinator), or the SuperLink still holds this "
            "site's previous connection, for about a minute after a SuperNode stopped without "
            "deactivating",
            True,
        )
    return f"the SuperNode exited with status {returncode}", True


class _Backoff:
    def __init__(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        delay = BACKOFF_SECONDS[min(self.attempt, len(BACKOFF_SECONDS) - 1)]
        self.attempt += 1
        return delay


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


def run_site_service(service: SiteService, *, say: Callable[[str], None] = _say) -> int:
    """Run until stopped (0) or until the SuperNode cannot be kept running (1)."""
    become_subreaper()
    stop, stop_executor = threading.Event(), threading.Event()
    _install_stop_handlers(stop)
    executor = SiteTaskExecutor(
        runtime_api_address=service.runtime_api_address,
        pin=service.pin,
        env=service.env,
        cwd=service.cwd,
        poll_interval=service.poll_interval,
    )
    executor_thread = threading.Thread(target=executor.run, args=(stop_executor,), daemon=True)
    executor_thread.start()
    say(f"site runner executes only fedmm {service.pin.version} ({service.pin.digest})")
    backoff, window_start, status = _Backoff(), time.monotonic(), 0
    supernode: subprocess.Popen[bytes] | None = None
    try:
        while not stop.is_set():
            supernode = start_child(
                service.supernode_argv,
                env=service.env,
                cwd=service.cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert supernode.stdout is not None
            output = SuperNodeOutput(supernode.stdout)
            while supernode.poll() is None and not stop.wait(0.5):
                reap_orphans(keep=[supernode.pid, *(r.pid for r in executor.runners)])
            if stop.is_set():
                break
            output.thread.join(timeout=5)
            executor.stop_runners()
            _stop_leftovers(say)
            if output.connected:
                backoff, window_start = _Backoff(), time.monotonic()
            reason, retry = exit_reason(output, supernode.returncode or 0)
            waited = time.monotonic() - window_start
            if not retry or waited >= service.retry_for:
                say(f"{reason}; not retrying" + (f" after {waited:.0f} s" if retry else ""))
                status = 1
                break
            delay = min(backoff.next(), max(1.0, service.retry_for - waited))
            say(
                f"{reason}; starting the SuperNode again in {delay:g} s (retries for "
                f"{service.retry_for - waited:.0f} s more)"
            )
            stop.wait(delay)
    finally:
        stop_executor.set()
        if supernode is not None and supernode.poll() is None:
            stop_processes([supernode.pid], timeout=30)  # it deactivates itself first
            supernode.wait()
        executor.stop_runners()
        executor_thread.join(timeout=10)
        _stop_leftovers(say)
    return status


def _stop_leftovers(say: Callable[[str], None]) -> None:
    """Stop whatever the SuperNode and the runners left running."""
    names = {pid: command_name(pid) for pid in descendants(os.getpid())}
    stopped = stop_descendants()
    if stopped:
        listed = ", ".join(f"{names.get(pid, '?')} ({pid})" for pid in stopped)
        say(f"stopped what was left running: {listed}")
