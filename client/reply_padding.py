"""Training replies padded in time, so that their timing does not reveal the site's work.

A site trains inside the training exchange (``train``, or SecAgg+'s ``train.secagg_setup``
or ``train.secagg_setup_share``), so the time from request to reply grows with the records it
loads and the Poisson batches it processes: about E n records for n records and E local
epochs, whatever the noisy count says.
A site whose policy sets ``min-reply-seconds`` = s sends no training reply (nor error) before
s seconds after the request reached its ClientApp. This is one Flower mod on the whole
ClientApp (``client.app``), so every training handler is padded the same way.

What timing still reveals: a reply later than s (the work took longer than s: the excess grows
with the record count, so s must exceed the site's longest training time); when the request
reached the ClientApp (the SuperNode's polling and process start-up, which do not depend on
the data); the timing of the later SecAgg+ stages (masking and unmasking, whose work depends
on the model size and the neighbour graph, both public); and whether the site took part or
refused (a refusal is sent as its code anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message

from fedmm.client.privacy_policy import PolicyError, SitePrivacyPolicy
from fedmm.common.secure_round import (
    ACTION_SETUP,
    ACTION_SETUP_SHARE,
    MESSAGE_SETUP,
    MESSAGE_SETUP_SHARE,
)

#: The message types in which a site trains, or evaluates on its held-out records (whose
#: time grows with their number, as training's does).
TRAINING_MESSAGE_TYPES = frozenset(
    {
        "train",
        MESSAGE_SETUP,
        MESSAGE_SETUP_SHARE,  # setup and share keys in one exchange: the site trains in it
        "evaluate",
        f"evaluate.{ACTION_SETUP}",
        f"evaluate.{ACTION_SETUP_SHARE}",
    }
)

Handler = Callable[[Message, Context], Message]


def padding_seconds(node_config: Mapping[str, Any]) -> float:
    """The site policy's ``min-reply-seconds`` (0 when the policy cannot be read: the
    handler itself then fails on it, saying why)."""
    try:
        return SitePrivacyPolicy.for_site(node_config).min_reply_seconds
    except PolicyError:
        return 0.0


def pad_training_replies(
    msg: Message,
    context: Context,
    call_next: Handler,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Message:
    """A Flower mod: run the handler; for a training message, return (or raise) no earlier
    than ``min-reply-seconds`` after the message arrived."""
    if msg.metadata.message_type not in TRAINING_MESSAGE_TYPES:
        return call_next(msg, context)
    arrived = clock()
    minimum = padding_seconds(context.node_config)
    try:
        return call_next(msg, context)
    finally:
        remaining = arrived + minimum - clock()
        if remaining > 0:
            sleep(remaining)
