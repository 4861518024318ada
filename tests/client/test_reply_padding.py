"""Training replies are padded to the site policy's ``min-reply-seconds``: their timing does
not reveal how much work (how many records) the site trained on, up to that bound."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client import app as client_app
from fedmm.client.privacy_policy import PolicyError, SitePrivacyPolicy
from fedmm.client.reply_padding import pad_training_replies, padding_seconds
from fedmm.common.secure_round import MESSAGE_SETUP, MESSAGE_SETUP_SHARE, MESSAGE_SHARE


class FakeClock:
    """Time moves only when the handler works or the mod sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _message(message_type: str) -> Message:
    return Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=message_type
    )


def _context(**node_config) -> Context:
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _handler(clock: FakeClock, work: float, *, fail: bool = False):
    def handle(msg: Message, context: Context) -> Message:
        clock.now += work
        if fail:
            raise RuntimeError("training failed")
        return Message(RecordDict(), reply_to=msg)

    return handle


@pytest.mark.parametrize(
    "message_type",
    ["train", MESSAGE_SETUP, MESSAGE_SETUP_SHARE, "evaluate.secagg_setup_share"],
)
@pytest.mark.parametrize("work", [0.5, 12.0, 29.9])
def test_a_training_reply_leaves_no_earlier_than_the_policy_says(message_type, work) -> None:
    clock = FakeClock()
    context = _context(**{"privacy-min-reply-seconds": 30.0})
    pad_training_replies(
        _message(message_type), context, _handler(clock, work), clock=clock, sleep=clock.sleep
    )
    assert clock.now == pytest.approx(130.0)  # the same reply time whatever the work


def test_longer_work_is_not_cut_and_errors_are_padded_too() -> None:
    clock = FakeClock()
    context = _context(**{"privacy-min-reply-seconds": 30.0})
    pad_training_replies(
        _message("train"), context, _handler(clock, 45.0), clock=clock, sleep=clock.sleep
    )
    assert clock.slept == [] and clock.now == 145.0  # what timing still reveals: > 30 s
    clock = FakeClock()
    with pytest.raises(RuntimeError):
        pad_training_replies(
            _message("train"),
            context,
            _handler(clock, 2.0, fail=True),
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.now == pytest.approx(130.0)


def test_other_stages_and_the_default_policy_are_not_padded() -> None:
    clock = FakeClock()
    padded = _context(**{"privacy-min-reply-seconds": 30.0})
    pad_training_replies(
        _message(MESSAGE_SHARE), padded, _handler(clock, 1.0), clock=clock, sleep=clock.sleep
    )
    pad_training_replies(
        _message("train"), _context(), _handler(clock, 1.0), clock=clock, sleep=clock.sleep
    )
    assert clock.slept == []


def test_the_value_comes_from_the_site_policy(tmp_path: Path) -> None:
    assert SitePrivacyPolicy().min_reply_seconds == 0.0  # simulated sites: no padding
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("[privacy]\nmin-reply-seconds = 45\n")
    assert padding_seconds({"policy-file": str(policy_file)}) == 45.0
    with pytest.raises(PolicyError, match="min-reply-seconds"):
        SitePrivacyPolicy(min_reply_seconds=-1.0)
    # A policy the site cannot read is the handler's to refuse; the mod does not pad it.
    assert padding_seconds({"privacy-min-reply-seconds": "soon"}) == 0.0


def test_the_client_app_pads_every_training_handler() -> None:
    assert pad_training_replies in client_app.app._mods
