"""``fedmm-supernode``: Flower 1.41.0's SuperNode with a prompt pull loop.

The launcher replaces two names in one module of the installed Flower; these tests pin what
that rests on: the installed Flower is the pinned one, its loop has exactly the sleeps the
clock replaces (one of 3 s after an empty pull, two of 0.5 s while a reply is not ready),
another version or source is refused, and the clock's delays.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from fedmm.client.supernode_polling import (
    PATCHED_MODULE,
    PINNED_MODULE_SHA256,
    IdlePollClock,
    install,
    pinned_flower_installed,
)
from fedmm.common.flower_pin import (
    PINNED_FLWR_VERSION,
    UnpinnedFlowerError,
    check_pinned_source,
    load_pinned_module,
)


def _source() -> bytes:
    spec = importlib.util.find_spec(PATCHED_MODULE)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).read_bytes()


def test_the_installed_flower_is_the_pinned_one() -> None:
    import flwr

    assert flwr.__version__ == PINNED_FLWR_VERSION
    check_pinned_source(PATCHED_MODULE, flwr.__version__, _source(), PINNED_MODULE_SHA256)
    assert pinned_flower_installed()


def test_another_version_or_source_is_refused() -> None:
    with pytest.raises(UnpinnedFlowerError, match=r"found flwr 1\.42\.0"):
        check_pinned_source(PATCHED_MODULE, "1.42.0", _source(), PINNED_MODULE_SHA256)
    changed = _source().replace(b"time.sleep(3)", b"time.sleep(2)")
    with pytest.raises(UnpinnedFlowerError):
        check_pinned_source(PATCHED_MODULE, PINNED_FLWR_VERSION, changed, PINNED_MODULE_SHA256)


def _sleep_calls(tree: ast.AST) -> list[float]:
    return [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "sleep"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "time"
        and isinstance(node.args[0], ast.Constant)
    ]


def test_the_pinned_loop_sleeps_where_the_clock_expects() -> None:
    tree = ast.parse(_source())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    loop = functions["start_client_internal"]
    assert _sleep_calls(loop) == [3]  # after an empty pull, the only sleep of the loop
    pulls = [
        node
        for node in ast.walk(loop)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "_pull_and_store_message"
    ]
    assert len(pulls) == 1  # looked up as a module global at each turn: the wrapper is seen
    assert sorted(_sleep_calls(functions["_push_messages"])) == [0.5, 0.5]
    assert sorted(_sleep_calls(tree)) == [0.5, 0.5, 3]
    object_pulls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "pull_objects"
    ]
    # one call, with the default backoff (no keyword for it): the partial's keywords apply
    assert len(object_pulls) == 1
    assert {k.arg for k in object_pulls[0].keywords} == {"pull_object_fn"}


def test_idle_delays_grow_to_three_seconds_and_restart_after_a_message() -> None:
    slept: list[float] = []
    clock = IdlePollClock(sleep_function=slept.append)
    for _ in range(12):
        clock.sleep(3)
    assert slept[0] == pytest.approx(0.1) and slept[1] == pytest.approx(0.15)
    assert slept == sorted(slept) and slept[-1] == 3.0
    assert sum(slept[:9]) < 10 and slept[9] == 3.0  # under 10 s of prompt polls, then 3 s
    clock.message_arrived()
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(1.25)
    assert slept[-3:] == [pytest.approx(0.1), 0.05, 1.25]
    assert clock.monotonic is time.monotonic  # everything else is the time module


def test_install_and_undo_on_the_pinned_module() -> None:
    module = load_pinned_module(PATCHED_MODULE, PINNED_MODULE_SHA256)
    original_time, original_pull = module.time, module._pull_and_store_message
    original_pull_objects = module.pull_objects
    clock = IdlePollClock()
    undo = install(module, clock)
    try:
        assert module.time is clock
        assert module._pull_and_store_message is not original_pull
        assert module.pull_objects.func is original_pull_objects
        assert module.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
    finally:
        undo()
    assert module.time is original_time and module._pull_and_store_message is original_pull
    assert module.pull_objects is original_pull_objects


def test_a_pulled_message_restarts_the_prompt_polls() -> None:
    """The wrapper around the pull: a run id (a message) resets the delay, None does not."""
    results = iter([None, None, 7, None])
    module = ModuleType("loop")
    module.time = time
    module._pull_and_store_message = lambda: next(results)
    module.pull_objects = lambda *args, **kwargs: {}
    slept: list[float] = []
    clock = IdlePollClock(sleep_function=slept.append)
    install(module, clock)
    for _ in range(4):
        if module._pull_and_store_message() is None:
            module.time.sleep(3)
    assert slept == [pytest.approx(0.1), pytest.approx(0.15), pytest.approx(0.1)]


def test_fedmm_supernode_runs_flowers_command() -> None:
    launcher = Path(sys.executable).parent / "fedmm-supernode"
    done = subprocess.run(
        [str(launcher), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage: flower-supernode" in done.stdout and "--isolation" in done.stdout


def test_the_runners_pull_mirrors_flowers_pull_task_input() -> None:
    """``client.runtime_pull.pull_task_input`` makes the calls of Flower 1.41.0's function
    of that name with a shorter backoff; pinned to that function's exact source."""
    import hashlib
    import inspect

    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(run_clientapp.pull_task_input)
    assert hashlib.sha256(source.encode()).hexdigest() == FLOWER_PULL_TASK_INPUT_SHA256
    assert "initial_backoff" not in source  # Flower's pull uses the 1 s default


FLOWER_PULL_TASK_INPUT_SHA256 = "5607a23e1673ee876930c1b35685b8dfdfd8b3776a436560b0467042e15fc695"
