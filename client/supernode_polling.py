"""``fedmm-supernode``: Flower 1.41.0's ``flower-supernode`` with a prompt pull loop.

Flower's SuperNode pulls its next message from the SuperLink in a loop that sleeps a fixed
3 s whenever the pull finds nothing, and waits for the ClientApp's reply in 0.5 s steps
(``flwr/supernode/start_client_internal.py``: ``time.sleep(3)``, ``time.sleep(0.5)``;
neither is configurable). A site that has just answered one SecAgg+ stage asks at once,
finds nothing (the coordinator is waiting for the other sites) and sleeps 3 s: that sleep
was most of every stage that does not train.

This launcher runs Flower's own ``flower-supernode`` command after replacing three names in
that one module, and nothing else:

- ``time``: an :class:`IdlePollClock`, which passes every attribute through to the
  ``time`` module except ``sleep``: the idle sleep of 3 s becomes a delay that starts at
  0.1 s after each message and grows by half at each empty pull, back to 3 s after about
  7.5 s without a message (9 pulls; an idle site then polls as rarely as before); the
  0.5 s waits for the local reply become 0.05 s (they read the SuperNode's own state, not
  the network);
- ``_pull_and_store_message``: wrapped to tell the clock when a message arrived;
- ``pull_objects``: the same function with a backoff of 50 ms doubling up to 0.5 s, not
  1 s doubling up to 10 s, while a message's objects are not yet at the SuperLink.

Both rest on the exact code of Flower 1.41.0, so the launcher refuses to start unless the
installed ``flwr`` is version 1.41.0 and that module's source has the SHA-256 it was
written against (``common.flower_pin``); on any other Flower, run plain
``flower-supernode`` (``fedmm site start`` tells which). Arguments are those of
``flower-supernode``.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from fedmm.common.flower_pin import UnpinnedFlowerError, is_pinned, load_pinned_module

#: SHA-256 of ``flwr/supernode/start_client_internal.py`` in flwr 1.41.0 (the wheel's file).
PINNED_MODULE_SHA256 = "d6342f743fdf768f63305b88414ae2654e9a21bda153739da19c608e8d375067"
PATCHED_MODULE = "flwr.supernode.start_client_internal"
IDLE_SLEEP_S = 3  # Flower's sleep after an empty pull
REPLY_WAIT_S = 0.5  # Flower's sleep while the reply (or one of its objects) is not ready


@dataclass
class IdlePollClock:
    """Stands in for the ``time`` module in Flower's SuperNode loop (module docstring)."""

    first: float = 0.1
    growth: float = 1.5
    longest: float = float(IDLE_SLEEP_S)
    reply_wait: float = 0.05
    sleep_function: Callable[[float], None] = time.sleep
    _next_idle: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.longest or self.growth < 1 or self.reply_wait <= 0:
            raise ValueError("need 0 < first <= longest, growth >= 1 and reply_wait > 0")
        self._next_idle = self.first

    def message_arrived(self) -> None:
        """Poll promptly again: the next stage of a round usually follows within a second."""
        self._next_idle = self.first

    def idle_delay(self) -> float:
        """The delay after this empty pull; the next one is longer, up to ``longest``."""
        delay = self._next_idle
        self._next_idle = min(self.longest, self._next_idle * self.growth)
        return delay

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP_S:
            seconds = self.idle_delay()
        elif seconds == REPLY_WAIT_S:
            seconds = self.reply_wait
        self.sleep_function(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


OBJECT_PULL_BACKOFF_S = (0.05, 0.5)  # first, longest


def install(module: ModuleType, clock: IdlePollClock) -> Callable[[], None]:
    """Put ``clock`` and the prompt object pulls into Flower's SuperNode ``module``; returns
    a function that undoes it."""
    original_time, original_pull = module.time, module._pull_and_store_message
    original_pull_objects = module.pull_objects

    def pull_and_store_message(*args: Any, **kwargs: Any) -> int | None:
        run_id = original_pull(*args, **kwargs)
        if run_id is not None:
            clock.message_arrived()
        return run_id

    module.time = clock
    module._pull_and_store_message = pull_and_store_message
    module.pull_objects = functools.partial(
        original_pull_objects,
        initial_backoff=OBJECT_PULL_BACKOFF_S[0],
        backoff_cap=OBJECT_PULL_BACKOFF_S[1],
    )

    def undo() -> None:
        module.time, module._pull_and_store_message = original_time, original_pull
        module.pull_objects = original_pull_objects

    return undo


def pinned_flower_installed() -> bool:
    """Whether the installed Flower is the pinned one, without importing it (cheap)."""
    return is_pinned(PATCHED_MODULE, PINNED_MODULE_SHA256)


def main(argv: list[str] | None = None) -> int:
    """``fedmm-supernode [flower-supernode arguments]``."""
    try:
        module = load_pinned_module(PATCHED_MODULE, PINNED_MODULE_SHA256)
    except UnpinnedFlowerError as error:
        print(
            f"fedmm-supernode: the prompt pull loop is {error}: run flower-supernode instead "
            "(it polls every 3 s)",
            file=sys.stderr,
        )
        return 2
    install(module, IdlePollClock())
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
