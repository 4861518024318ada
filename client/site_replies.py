"""A site's refusal as a reply: only its public code goes out, the detail stays in the log.

No numpy and no Flower at import time: the site runner (``client.site_runner``) uses this
before it knows whether the run's app is the pinned release.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedmm.common.site_refusal import RECORD_STATUS, SiteRefusal, status_payload

if TYPE_CHECKING:
    from flwr.app import Message

logger = logging.getLogger(__name__)

#: The detail of each refusal made in this process, by the refused message's id, until the
#: site's audit log takes it (``client.site_audit``); it never goes into the reply.
_refusal_details: dict[str, str] = {}
_MAX_DETAILS = 64


def refusal_reply(message: Message, refusal: SiteRefusal) -> Message:
    """A reply that carries only the refusal's code (``common.site_refusal``)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    status = ConfigRecord(status_payload(refusal))
    return Message(RecordDict({RECORD_STATUS: status}), reply_to=message)


def refuse(message: Message, refusal: SiteRefusal) -> Message:
    """The reply to a refused request: the code goes out, the detail is logged here."""
    logger.warning("site refuses %s: %s", message.metadata.message_type, refusal)
    _refusal_details[message.metadata.message_id] = refusal.detail
    while len(_refusal_details) > _MAX_DETAILS:
        _refusal_details.pop(next(iter(_refusal_details)))
    return refusal_reply(message, refusal)


def take_refusal_detail(message: Message) -> str | None:
    """The detail of this process's refusal of ``message`` (once), or None."""
    return _refusal_details.pop(message.metadata.message_id, None)
