"""The site's executor: claims each ClientApp task of its SuperNode and runs the site's code.

``flower-supernode --isolation process`` queues a task for every message it receives and
waits for an outside process to claim it through its Runtime API (``AcquireTask``); Flower's
own ``flower-superexec`` would start ``flwr-clientapp``, which installs and runs the FAB
that the run's submitter shipped. This executor claims the tasks instead and hands them to
:mod:`client.site_runner`, started from the installed release with the release pin
(:mod:`client.release_pin`): by default one warm runner (``--serve``) that gets each task's
token on a line of its standard input and is started again when it has exited; with
``warm=False``, a fresh runner per task. It claims only ClientApp tasks; the SuperNode
handles one message at a time, so at most one task runs at once.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedmm.client.release_pin import ReleasePin
from fedmm.common.process_supervision import start_child, stop_processes

logger = logging.getLogger("fedmm.site_executor")


def runner_argv(*, runtime_api_address: str, pin: ReleasePin, warm: bool = True) -> list[str]:
    """The site runner's command: this Python, isolated (``-I``: no working directory or
    ``PYTHONPATH`` on ``sys.path``), so ``client`` is the installed package."""
    return [
        sys.executable,
        "-I",
        "-m",
        "fedmm.client.site_runner",
        "--runtime-api-address",
        runtime_api_address,
        "--release-version",
        pin.version,
        "--release-digest",
        pin.digest,
        *(["--serve"] if warm else []),
    ]


@dataclass
class SiteTaskExecutor:
    """Poll the SuperNode's Runtime API for ClientApp tasks; one site runner per task."""

    runtime_api_address: str
    pin: ReleasePin
    env: Mapping[str, str]
    cwd: Path
    poll_interval: float = 0.1
    warm: bool = True
    runners: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tasks_started: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, stop: threading.Event) -> None:
        """Claim and start tasks until ``stop`` is set (the thread's target)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        retry = make_simple_http_retry_invoker()
        retry.max_tries = 1  # this loop retries, and stops when asked
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=retry,
        )
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not stop.is_set():
                self._forget_finished()
                try:
                    response = client.AcquireTask(request)
                except Exception:
                    stop.wait(1.0)
                    continue
                if response.HasField("task") and response.token:
                    self._launch(response.token, response.task.task_id)
                    continue
                stop.wait(self.poll_interval)
        finally:
            client.close()

    def _launch(self, token: str, task_id: int) -> None:
        for _attempt in range(2):  # a warm runner that has just died is started again
            runner = self._runner()
            assert runner.stdin is not None
            try:
                runner.stdin.write(token.encode() + b"\n")
                if self.warm:
                    runner.stdin.flush()
                else:
                    runner.stdin.close()
                break
            except OSError:
                logger.warning("site runner for task %d exited before it got its token", task_id)
                runner.wait()
        with self._lock:
            self.tasks_started += 1

    def _runner(self) -> subprocess.Popen[bytes]:
        """The warm runner (started when none is alive), or a fresh runner for one task."""
        with self._lock:
            alive = [r for r in self.runners if r.poll() is None]
            if self.warm and alive:
                return alive[0]
        argv = runner_argv(
            runtime_api_address=self.runtime_api_address, pin=self.pin, warm=self.warm
        )
        runner = start_child(argv, env=self.env, cwd=self.cwd, stdin=subprocess.PIPE)
        with self._lock:
            self.runners.append(runner)
        return runner

    def _forget_finished(self) -> None:
        with self._lock:
            self.runners = [r for r in self.runners if r.poll() is None]

    def stop_runners(self, *, timeout: float = 10.0) -> None:
        """End every runner still busy (their SuperNode is gone or stopping)."""
        with self._lock:
            pids = [r.pid for r in self.runners if r.poll() is None]
        stop_processes(pids, timeout=timeout)
        self._forget_finished()
