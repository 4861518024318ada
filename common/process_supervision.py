"""Start daemons and stop every process they started, whatever became of them (Linux).

Flower's daemons start helpers that leave their process tree: the SuperLink's and the
SuperNode's ``flower-superexec`` run in a session of their own and start ``flwr-serverapp``
or app processes, which outlive a daemon that crashed (they then wait on a server that is
gone). A supervisor that stops "its child" therefore leaves them running. Here the
supervisor makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): whatever
its children start and orphan is re-parented to it, not to init, so
:func:`stop_descendants` finds and ends all of them, and :func:`reap_orphans` collects
their exit status. Each child also gets ``SIGTERM`` when the supervisor dies
(``PR_SET_PDEATHSIG``), so even a ``SIGKILL`` of the supervisor stops its daemons.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None, use_errno=True)
_PRCTL = _LIBC.prctl


def become_subreaper() -> None:
    """Orphans among this process's descendants are re-parented to it (Linux 3.4+)."""
    if _PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _terminate_with_parent() -> None:  # runs in the child between fork and exec
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_child(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """``argv`` as a child that receives SIGTERM when this process dies."""
    return subprocess.Popen(
        argv,
        env=dict(env),
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_terminate_with_parent,
    )


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ...


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, now."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def command_name(pid: int) -> str:
    """The program a process runs (its first argument's base name), for messages."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    names = [Path(a.decode(errors="replace")).name for a in argv[:2] if a]
    if len(names) == 2 and names[0].startswith("python"):
        return names[1]
    return names[0] if names else "?"


def reap_orphans(keep: Iterable[int] = ()) -> None:
    """Collect the exit status of dead children other than ``keep`` (the ``Popen`` children
    whose status their owner reads): orphans re-parented to this subreaper."""
    kept = set(keep)
    for pid in descendants(os.getpid()):
        if pid in kept:
            continue
        fields = _stat_fields(pid)
        if fields is not None and fields[0] == "Z" and int(fields[1]) == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def stop_processes(pids: Iterable[int], *, timeout: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``timeout``; returns the PIDs still running (none)."""
    pids = [pid for pid in pids if is_running(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(p) for p in pids):
        reap_orphans()
        time.sleep(0.1)
    for pid in pids:
        if is_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    reap_orphans()
    return [pid for pid in pids if is_running(pid)]


def stop_descendants(*, except_pids: Iterable[int] = (), timeout: float = 15.0) -> list[int]:
    """Stop every descendant of this process except ``except_pids`` and their descendants;
    returns the PIDs it stopped."""
    spared = set(except_pids)
    for pid in list(spared):
        spared.update(descendants(pid))
    targets = [p for p in descendants(os.getpid()) if p not in spared and is_running(p)]
    stop_processes(targets, timeout=timeout)
    return targets
