"""A supervisor finds and stops what its children orphaned (it is their subreaper), and its
children get SIGTERM when it dies. Each case runs in a process of its own: becoming a
subreaper changes the process that does it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from fedmm.common.process_supervision import is_running
from fedmm.simulations.loopback_daemons import wait_until

SUPERVISOR = textwrap.dedent(
    """
    import subprocess, sys, time
    from fedmm.common.process_supervision import (
        become_subreaper, descendants, is_running, start_child, stop_descendants,
    )
    become_subreaper()
    # The child starts a grandchild in a new session and exits: the grandchild is orphaned.
    child = start_child(
        ["sh", "-c", "setsid sleep 300 & echo $!"], env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
    )
    orphan = int(child.stdout.readline())
    child.wait()
    time.sleep(0.3)
    print(orphan, orphan in descendants(__import__("os").getpid()), flush=True)
    stopped = stop_descendants(timeout=5)
    print(orphan in stopped, is_running(orphan), flush=True)
    """
)


def test_an_orphaned_grandchild_stays_in_reach_and_is_stopped() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SUPERVISOR], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("\n")[:2]
    orphan, reachable = first.split()
    assert reachable == "True"  # re-parented to the supervisor, not to init
    assert second == "True False"  # stopped, and not running
    assert not is_running(int(orphan))


DYING_SUPERVISOR = textwrap.dedent(
    """
    import os, signal
    from fedmm.common.process_supervision import start_child
    child = start_child(["sleep", "300"], env={"PATH": "/usr/bin:/bin"})
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_children_get_sigterm_when_their_supervisor_is_killed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DYING_SUPERVISOR], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -9, done.stderr
    child = int(done.stdout.split()[0])
    assert wait_until(lambda: not is_running(child), timeout=10, interval=0.1)
