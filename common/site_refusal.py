"""Why a site says no: a public code for the coordinator, a detail for the site's own log.

A site's refusal reaches the coordinator as a code from :class:`RefusalCode` and nothing
else: the detail (exact epsilons, record counts, file paths, the policy's reasoning) may
reveal something about the site's data or set-up, so it stays in the site's log. Both sides
import this module; it has no Flower and no torch dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class RefusalCode(StrEnum):
    """The public reason of a refusal (what the coordinator's logs and reports show)."""

    #: This round would take the run past the epsilon the run asked for (the coordinator
    #: may ask for more epsilon or fewer rounds).
    PRIVACY_BUDGET = "privacy-budget"
    #: This round would take the site past its lifetime budget (its policy's max-epsilon
    #: over every run: only the site's own operator can change that).
    LIFETIME_BUDGET = "lifetime-budget"
    #: The request conflicts with the site's privacy policy (delta, noise floor, DP mode).
    PRIVACY_POLICY = "privacy-policy"
    #: The site's ledger cannot tell what this run already spent (no persistent ledger).
    LEDGER_UNKNOWN = "ledger-unknown"
    #: The site already trained in this round (a replayed or repeated request).
    ALREADY_TRAINED = "already-trained"
    #: Secure-aggregation parameters weaker than the site's policy allows.
    SECAGG_POLICY = "secagg-policy"
    #: Fewer sites in the aggregate than the site's minimum aggregation size.
    TOO_FEW_SITES = "too-few-sites"
    #: A stale, replayed or out-of-order protocol message.
    OUT_OF_ORDER = "out-of-order"
    #: A malformed or inconsistent request.
    BAD_REQUEST = "bad-request"
    #: Keys, signatures or a roster the site cannot authenticate (active-coordinator mode):
    #: an unknown or unsigned site, a substituted or replayed key, a survivor set too few
    #: sites signed.
    UNAUTHENTICATED = "unauthenticated"
    #: The site has no usable records for this request.
    NO_DATA = "no-data"
    #: The run's app is not the release the site installed and pinned: nothing of it ran.
    UNTRUSTED_APP = "untrusted-app"
    #: The site's copy of a frozen pretrained encoder's weights is missing or is not the
    #: one the run pins by SHA-256: its features would not be the run's.
    FROZEN_WEIGHTS = "frozen-weights"
    #: The site's code failed on this request; the error stays in the site's log.
    SITE_ERROR = "site-error"


@dataclass(frozen=True)
class SiteRefusal:
    """A refusal: ``code`` may be sent, ``detail`` is for the site's log only."""

    code: RefusalCode
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.code.value}: {self.detail}" if self.detail else self.code.value


#: The record of every reply that says whether the site refused, and why (by code only).
RECORD_STATUS = "status"
#: The status record's fields: no free text, only the code.
STATUS_REFUSED = "refused"
STATUS_CODE = "code"


def status_payload(refusal: SiteRefusal | None) -> dict[str, Any]:
    """The ConfigRecord content of a reply's status: refused or not, and the code."""
    if refusal is None:
        return {STATUS_REFUSED: False, STATUS_CODE: ""}
    return {STATUS_REFUSED: True, STATUS_CODE: refusal.code.value}


def refusal_code_of(status: Mapping[str, Any] | None) -> str | None:
    """The code of a refused reply's status (an unknown code is kept as ``"unknown"``);
    ``None`` when the reply is not a refusal."""
    if status is None or not bool(status.get(STATUS_REFUSED, False)):
        return None
    code = status.get(STATUS_CODE, "")
    known = {member.value for member in RefusalCode}
    return code if isinstance(code, str) and code in known else "unknown"
