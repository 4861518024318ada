"""``ReplyPollingGrid``: Flower's send-and-receive semantics with a short reply poll.

``ScriptedGrid`` is a Grid whose sites answer after a given delay (or never); deployment
runs the wrapper for real in ``tests/simulations/test_deployment_loopback.py`` (slow).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmm.server.reply_polling import ReplyPollingGrid


class ScriptedGrid(Grid):
    """Node n answers ``delays[n]`` seconds after the push; ``None`` never answers."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.due: dict[str, tuple[float, Message]] = {}
        self.pulls = 0

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                reply = Message(RecordDict({"c": ConfigRecord({"ok": True})}), reply_to=msg)
                self.due[msg.metadata.message_id] = (time.monotonic() + delay, reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now = time.monotonic()
        ready = [i for i in message_ids if i in self.due and self.due[i][0] <= now]
        return [self.due.pop(i)[1] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("the wrapper must not fall back to the slow poll")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 5, 1, 1


def _messages(nodes: list[int]) -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=n, message_type="train.secagg_share", ttl=60)
        for n in nodes
    ]


def test_every_reply_comes_back_and_the_poll_backs_off() -> None:
    scripted = ScriptedGrid({1: 0.0, 2: 0.3, 3: 0.6})
    messages = _messages([1, 2, 3])
    replies = list(ReplyPollingGrid(scripted).send_and_receive(messages, timeout=30))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    assert sorted(sent[r.metadata.reply_to_message_id] for r in replies) == [1, 2, 3]
    # 0.6 s at 0.1 s growing by 1.5x to 0.5 s: a handful of pulls, not 6 nor 1
    assert 3 <= scripted.pulls <= 6, scripted.pulls


def test_a_site_that_never_answers_is_absent_after_the_timeout() -> None:
    scripted = ScriptedGrid({1: 0.0, 2: None})
    grid = ReplyPollingGrid(scripted, first_poll=0.05, max_poll=0.1)
    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=0.5))
    assert [r.metadata.src_node_id for r in replies] == [1]


def test_bad_poll_intervals_are_refused() -> None:
    with pytest.raises(ValueError, match="first_poll"):
        ReplyPollingGrid(ScriptedGrid({}), first_poll=1.0, max_poll=0.5)


def test_the_poll_restarts_when_a_reply_arrives() -> None:
    """Replies at 0.9 s and 1.4 s: pulls at 0, 0.1, 0.25, 0.48, 0.81 and 1.31 s (the first
    reply); then 0.1 s later (the second), not after the 0.5 s the backoff had reached."""
    scripted = ScriptedGrid({1: 0.9, 2: 1.4})
    started = time.monotonic()
    replies = list(ReplyPollingGrid(scripted).send_and_receive(_messages([1, 2]), timeout=30))
    assert len(replies) == 2
    assert time.monotonic() - started < 1.65  # 1.81 s when the poll did not restart


def test_replies_objects_are_pulled_promptly_from_the_pinned_http_grid() -> None:
    """Flower's own HTTP Grid (constructed, not connected): its module's ``pull_objects``
    gets the short backoff; any other Grid is left alone."""
    import ast
    import functools
    import importlib
    from pathlib import Path

    from flwr.superlink.grid.http_grid import HttpGrid

    from fedmm.server.reply_polling import HTTP_GRID_MODULE, OBJECT_PULL_BACKOFF_S

    module = importlib.import_module(HTTP_GRID_MODULE)
    original = module.pull_objects
    assert not ReplyPollingGrid(ScriptedGrid({})).prompt_object_pulls
    try:
        grid = ReplyPollingGrid(HttpGrid("127.0.0.1:9", insecure=True, token="t"))
        assert grid.prompt_object_pulls
        assert isinstance(module.pull_objects, functools.partial)
        assert module.pull_objects.func is original
        assert module.pull_objects.keywords == dict(
            zip(("initial_backoff", "backoff_cap"), OBJECT_PULL_BACKOFF_S, strict=True)
        )
        ReplyPollingGrid(HttpGrid("127.0.0.1:9", insecure=True, token="t"))
        assert module.pull_objects.func is original  # not wrapped twice
    finally:
        module.pull_objects = original
    # What the partial relies on: the module's one call passes no backoff of its own.
    tree = ast.parse(Path(str(module.__file__)).read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "pull_objects"
    ]
    assert len(calls) == 1
    assert {k.arg for k in calls[0].keywords} == {"object_ids", "pull_object_fn"}
