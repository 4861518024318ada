"""The site's executor hands tasks to one warm site runner, started again when it exits.

Real runner processes (``python -I -m fedmm.client.site_runner --serve``), pointed at a Runtime
API address where nothing listens: the tasks themselves fail (and say so in the runner's
log); what is checked is which process gets each token.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from fedmm.client.release_pin import ReleasePin
from fedmm.client.site_executor import SiteTaskExecutor, runner_argv

PIN = ReleasePin("0.1.0", "0" * 64)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executor(tmp_path: Path, *, warm: bool) -> SiteTaskExecutor:
    return SiteTaskExecutor(
        runtime_api_address=f"127.0.0.1:{_closed_port()}",
        pin=PIN,
        env=dict(os.environ),
        cwd=tmp_path,
        warm=warm,
    )


def test_runner_command() -> None:
    warm = runner_argv(runtime_api_address="127.0.0.1:1", pin=PIN)
    assert warm[1:4] == ["-I", "-m", "fedmm.client.site_runner"] and warm[-1] == "--serve"
    assert "--serve" not in runner_argv(runtime_api_address="127.0.0.1:1", pin=PIN, warm=False)


def test_one_warm_runner_gets_every_task_and_is_replaced_when_it_dies(tmp_path: Path) -> None:
    executor = _executor(tmp_path, warm=True)
    try:
        executor._launch("token-1", 1)
        executor._launch("token-2", 2)
        alive = [r for r in executor.runners if r.poll() is None]
        assert len(alive) == 1 and executor.tasks_started == 2
        first = alive[0]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        executor._launch("token-3", 3)
        alive = [r for r in executor.runners if r.poll() is None]
        assert len(alive) == 1 and alive[0].pid != first.pid and executor.tasks_started == 3
    finally:
        executor.stop_runners(timeout=5)
    assert all(r.poll() is not None for r in executor.runners)


def test_without_warm_each_task_gets_its_own_runner(tmp_path: Path) -> None:
    executor = _executor(tmp_path, warm=False)
    try:
        executor._launch("token-1", 1)
        executor._launch("token-2", 2)
        assert len({r.pid for r in executor.runners}) == 2
    finally:
        executor.stop_runners(timeout=5)
