"""``fedmm coordinator start-superlink``: the SuperLink and its Fleet proxy, kept running and
cleaned up.

One process supervises the coordinator's daemons: ``flower-superlink`` (on loopback) and,
with a public address, nginx (``server.fleet_proxy``). It is their subreaper
(``common.process_supervision``), so the helpers the SuperLink starts outside its own
process tree (``flower-superexec``, ``flwr-serverapp``) stay its descendants:

- when the SuperLink exits by itself (a crash), whatever it left running is stopped
  (a ServerApp orphaned by a crash otherwise waits on a SuperLink that is gone, and would
  write to the run's out dir beside the resumed run), named in the log, and the SuperLink
  is started again after a growing delay; sites reconnect by themselves and ``fedmm
  coordinator submit --resume`` continues the run. A SuperLink that exits within its first
  10 seconds is not restarted: that is a start-up problem to fix;
- the proxy is restarted the same way;
- on SIGTERM or SIGINT both are stopped, then every process started from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedmm.common.process_supervision import (
    become_subreaper,
    command_name,
    descendants,
    reap_orphans,
    start_child,
    stop_descendants,
    stop_processes,
)

BACKOFF_SECONDS = (2.0, 5.0, 10.0, 30.0)
#: A daemon that dies sooner than this after its start is not restarted.
MIN_UPTIME_SECONDS = 10.0
#: The SuperLink waits for its runs to end on SIGTERM (about 50 s, see the operator guide).
SUPERLINK_STOP_SECONDS = 90.0


def _say(text: str) -> None:
    print(f"fedmm coordinator: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CoordinatorService:
    """What ``start-superlink`` runs: the SuperLink, and the proxy when sites use one."""

    superlink_argv: list[str]
    env: Mapping[str, str]
    cwd: Path
    proxy_argv: list[str] | None = None


@dataclass
class _Daemon:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


def run_coordinator_service(
    service: CoordinatorService, *, say: Callable[[str], None] = _say
) -> int:
    """Run until stopped (0) or until a daemon cannot start (1)."""
    become_subreaper()
    stop = threading.Event()
    _install_stop_handlers(stop)
    daemons = [_Daemon("SuperLink", service.superlink_argv)]
    if service.proxy_argv is not None:
        daemons.append(_Daemon("Fleet proxy (nginx)", service.proxy_argv))

    def start(daemon: _Daemon) -> None:
        daemon.process = start_child(daemon.argv, env=service.env, cwd=service.cwd)
        daemon.started_at = time.monotonic()

    status = 0
    try:
        for daemon in daemons:
            start(daemon)
        while not stop.wait(0.5):
            reap_orphans(keep=[d.process.pid for d in daemons if d.process is not None])
            for daemon in daemons:
                assert daemon.process is not None
                code = daemon.process.poll()
                if code is None:
                    continue
                uptime = time.monotonic() - daemon.started_at
                spared = [d.process.pid for d in daemons if d is not daemon and d.process]
                left = _stop_left_over(spared)
                what = f"the {daemon.name} exited with status {code} after {uptime:.0f} s"
                if left:
                    what += f"; stopped what it left running: {left}"
                if uptime < MIN_UPTIME_SECONDS:
                    say(f"{what}; not restarting it (it failed at start: see its log above)")
                    status = 1
                    stop.set()
                    break
                delay = BACKOFF_SECONDS[min(daemon.restarts, len(BACKOFF_SECONDS) - 1)]
                say(f"{what}; starting it again in {delay:g} s")
                if stop.wait(delay):
                    break
                daemon.restarts += 1
                start(daemon)
    finally:
        for daemon in daemons:  # the SuperLink first: it stops its runs
            if daemon.process is not None and daemon.process.poll() is None:
                stop_processes([daemon.process.pid], timeout=SUPERLINK_STOP_SECONDS)
                daemon.process.wait()
        left = _stop_left_over([])
        if left:
            say(f"stopped what was left running: {left}")
    return status


def _stop_left_over(spared: list[int]) -> str:
    """Stop every descendant except ``spared`` (and theirs); their names, for the log."""
    keep = set(spared)
    for pid in spared:
        keep.update(descendants(pid))
    names = {pid: command_name(pid) for pid in descendants(os.getpid()) if pid not in keep}
    stopped = stop_descendants(except_pids=spared)
    return ", ".join(f"{names.get(pid, '?')} ({pid})" for pid in stopped)
