"""A Grid that looks for replies every 0.1-0.5 s instead of every 3 s.

In deployment, Flower 1.41's ServerApp talks to the SuperLink through an HTTP Grid whose
``send_and_receive`` pushes the messages and then pulls replies with ``time.sleep(3)``
between pulls (``flwr/superlink/grid/http_grid.py``): every message exchange lasts a
multiple of 3 s however fast the sites answer, which is most of a SecAgg+ stage that only
shuffles keys and shares. :class:`ReplyPollingGrid` keeps Flower's semantics (push, then
pull until every reply arrived or ``timeout`` passed; missing replies are simply absent)
with the public ``push_messages``/``pull_messages``, polling after 0.1 s and backing off to
0.5 s, so a long training stage costs a pull every half second. In simulation the in-memory
Grid already polls every 0.1 s; wrapping it changes nothing there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

FIRST_POLL_S = 0.1
MAX_POLL_S = 0.5
BACKOFF = 1.5


class ReplyPollingGrid(Grid):
    """``grid`` with a faster ``send_and_receive``; everything else is ``grid``'s own."""

    def __init__(
        self, grid: Grid, *, first_poll: float = FIRST_POLL_S, max_poll: float = MAX_POLL_S
    ) -> None:
        if not 0 < first_poll <= max_poll:
            raise ValueError(
                f"poll intervals: need 0 < first_poll <= max_poll, got {first_poll}, {max_poll}"
            )
        self.grid = grid
        self.first_poll = first_poll
        self.max_poll = max_poll

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
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = self.first_poll
        while waiting:
            pulled = list(self.grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(interval)
            interval = min(self.max_poll, interval * BACKOFF)
        return replies
