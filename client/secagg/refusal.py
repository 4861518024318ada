"""A site's refusal of a secure-aggregation request (Bonawitz et al., CCS 2017; Bell et al.,
CCS 2020): what the coordinator is told is a code, the reason stays in the site's log."""

from __future__ import annotations

from fedmm.common.secagg.payload_validation import InvalidPayloadError
from fedmm.common.site_refusal import RefusalCode, SiteRefusal


class SecAggRefusal(InvalidPayloadError):
    """The site refuses a request; the reason names what was wrong, never a secret.

    ``code`` is what the coordinator is told (``common.site_refusal``); the message stays in
    the site's log.
    """

    def __init__(self, message: str, *, code: RefusalCode = RefusalCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code

    def refusal(self) -> SiteRefusal:
        return SiteRefusal(self.code, str(self))
