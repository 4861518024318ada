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


def refusal_reply(message: Message, refusal: SiteRefusal) -> Message:
    """A reply that carries only the refusal's code (``common.site_refusal``)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    status = ConfigRecord(status_payload(refusal))
    return Message(RecordDict({RECORD_STATUS: status}), reply_to=message)


def refuse(message: Message, refusal: SiteRefusal) -> Message:
    """The reply to a refused request: the code goes out, the detail is logged here."""
    logger.warning("site refuses %s: %s", message.metadata.message_type, refusal)
    return refusal_reply(message, refusal)
