"""Replies to a message exchange, pulled with a short, growing interval instead of every 3 s.

In deployment, Flower 1.41's ServerApp talks to the SuperLink through an HTTP Grid whose
``send_and_receive`` pushes the messages and then pulls replies with ``time.sleep(3)``
between pulls (``flwr/superlink/grid/http_grid.py``): every message exchange lasts a
multiple of 3 s however fast the sites answer, which is most of a SecAgg+ stage that only
shuffles keys and shares. :class:`ReplyPollingGrid` keeps Flower's semantics (push, then
pull until every reply arrived or ``timeout`` passed; missing replies are simply absent)
with the public ``push_messages``/``pull_messages``, polling after 0.1 s and backing off to
0.5 s, back to 0.1 s whenever a reply arrived (the others usually follow), so a long
training stage costs a pull every half second. In simulation the in-memory Grid already
polls every 0.1 s; wrapping it changes nothing there.

A site sends its reply's header before the reply's objects, so a pull often finds a reply
whose objects are not all at the SuperLink yet; Flower's HTTP Grid then waits 1 s, 2 s...
(``pull_objects``' default backoff) before it asks again. When the wrapped Grid is that
one, of the pinned Flower 1.41.0 (``common.flower_pin``: version and source hash), its
module's ``pull_objects`` becomes the same function with a 20 ms backoff doubling up to
0.25 s (:func:`prompt_object_pulls`); on any other Flower it is left as it is.

:func:`poll_replies` is the one poller; the SecAgg+ exchanges after setup, which only move
keys and shares, use it with a schedule of milliseconds (:data:`PROTOCOL_POLL`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedmm.common.flower_pin import is_pinned, load_pinned_module


@dataclass(frozen=True)
class PollSchedule:
    """The first wait after a push, the longest wait between pulls, and the growth factor."""

    first: float
    longest: float
    growth: float = 1.5

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.longest or self.growth < 1:
            raise ValueError(
                "poll intervals: need 0 < first_poll <= max_poll and growth >= 1, got "
                f"{self.first}, {self.longest}, {self.growth}"
            )


#: Exchanges in which sites train: a pull every 0.1 s at first, every 0.5 s at most.
TRAINING_POLL = PollSchedule(first=0.1, longest=0.5, growth=1.5)
#: SecAgg+ exchanges after setup: sites answer within milliseconds.
PROTOCOL_POLL = PollSchedule(first=0.005, longest=0.05, growth=2.0)


def poll_replies(
    grid: Grid, messages: Sequence[Message], *, timeout: float | None, schedule: PollSchedule
) -> list[Message]:
    """Push ``messages``; pull replies until every message has one or ``timeout`` seconds
    passed (Flower's ``send_and_receive`` semantics: a missing reply is simply absent),
    waiting ``schedule.first`` after the push and ``growth`` times longer after each pull,
    up to ``schedule.longest``, and back to ``schedule.first`` whenever a reply arrived. An
    object that offers only ``send_and_receive`` (an in-process test grid) is used as is."""
    if not hasattr(grid, "pull_messages"):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    interval = schedule.first
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        remaining = None if deadline is None else deadline - time.monotonic()
        if not waiting or (remaining is not None and remaining <= 0):
            break
        if pulled:  # the other replies usually follow soon
            interval = schedule.first
        time.sleep(interval if remaining is None else min(interval, remaining))
        interval = min(schedule.longest, interval * schedule.growth)
    return replies


HTTP_GRID_MODULE = "flwr.superlink.grid.http_grid"
#: SHA-256 of ``flwr/superlink/grid/http_grid.py`` in flwr 1.41.0 (the wheel's file).
HTTP_GRID_SHA256 = "0c33918af5016310ba84ad42643944d498bbf5ebdb55d62f4655ee00e94d72db"
OBJECT_PULL_BACKOFF_S = (0.02, 0.25)  # first, longest


def prompt_object_pulls(grid: Grid) -> bool:
    """Shorten the object-pull backoff of ``grid``'s module when it is the pinned Flower's
    HTTP Grid; whether it was done (or had been)."""
    if type(grid).__module__ != HTTP_GRID_MODULE or not is_pinned(
        HTTP_GRID_MODULE, HTTP_GRID_SHA256
    ):
        return False
    module = load_pinned_module(HTTP_GRID_MODULE, HTTP_GRID_SHA256)
    if not isinstance(module.pull_objects, functools.partial):
        module.pull_objects = functools.partial(
            module.pull_objects,
            initial_backoff=OBJECT_PULL_BACKOFF_S[0],
            backoff_cap=OBJECT_PULL_BACKOFF_S[1],
        )
    return True


class ReplyPollingGrid(Grid):
    """``grid`` with a faster ``send_and_receive``; everything else is ``grid``'s own."""

    def __init__(
        self,
        grid: Grid,
        *,
        first_poll: float = TRAINING_POLL.first,
        max_poll: float = TRAINING_POLL.longest,
    ) -> None:
        self.grid = grid
        self.schedule = PollSchedule(first=first_poll, longest=max_poll)
        self.prompt_object_pulls = prompt_object_pulls(grid)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull replies until all arrived or ``timeout`` s passed."""
        return poll_replies(self.grid, list(messages), timeout=timeout, schedule=self.schedule)
