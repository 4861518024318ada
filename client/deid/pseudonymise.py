"""Replace personal data in a caption with typed pseudonyms or typed redaction tokens.

A pseudonym is ``<TYPE_xxxxxxxx>`` where ``xxxxxxxx`` is the start of
``HMAC-SHA256(site_secret, TYPE || 0x00 || normalised value)``. The same value gets the same
pseudonym everywhere in one site (so a model can still learn that two captions mention the
same person), different sites get unrelated pseudonyms, and without the site secret nobody
can test a guess: a plain or unkeyed hash of a name or phone number is reversed by hashing
candidates, a keyed one is not. A redaction token is just ``<TYPE>``.

Values are normalised before hashing so that formatting does not split one identity into
several pseudonyms: digits only for phone, card and SSN numbers, case-folded and
whitespace-collapsed text for the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from enum import StrEnum

from fedmm.client.deid.text_pii import PiiSpan, PiiType

#: Shortest site secret accepted (the site secret module makes 32 bytes).
MIN_SECRET_BYTES = 16

_DIGIT_TYPES = frozenset({PiiType.PHONE, PiiType.PAYMENT_CARD, PiiType.US_SSN})


class TextAction(StrEnum):
    """What replaces a finding in a caption."""

    PSEUDONYMISE = "pseudonymise"
    REDACT = "redact"


def normalise_value(value: str, pii_type: PiiType) -> str:
    """The form of ``value`` that is hashed: digits only for numbers, otherwise case-folded
    with runs of whitespace collapsed."""
    if pii_type in _DIGIT_TYPES:
        digits = re.sub(r"\D", "", value)
        # +1 415 555 0132 and (415) 555-0132 are the same US number.
        return (
            digits[1:]
            if pii_type is PiiType.PHONE and len(digits) == 11 and digits[0] == "1"
            else digits
        )
    return " ".join(value.casefold().split())


def pseudonym_for(value: str, pii_type: PiiType, secret: bytes, *, digest_chars: int = 8) -> str:
    """Typed keyed pseudonym of ``value``, e.g. ``<PERSON_3f9a1c2b>``.

    ``digest_chars`` hex characters of the HMAC are kept (8 = 32 bits: collisions between two
    values of one type in a site are rare and only merge two pseudonyms; the key, not the
    length, is what prevents reversal).
    """
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"site secret must be at least {MIN_SECRET_BYTES} bytes")
    if not 4 <= digest_chars <= 64:
        raise ValueError(f"digest_chars must be in [4, 64], got {digest_chars}")
    message = pii_type.value.encode() + b"\x00" + normalise_value(value, pii_type).encode()
    digest = hmac.new(secret, message, hashlib.sha256).hexdigest()
    return f"<{pii_type.value}_{digest[:digest_chars]}>"


def redaction_token(pii_type: PiiType) -> str:
    """Typed redaction token, e.g. ``<EMAIL>``."""
    return f"<{pii_type.value}>"


def replace_spans(
    text: str,
    spans: Sequence[PiiSpan],
    *,
    action: TextAction,
    secret: bytes | None = None,
) -> str:
    """``text`` with every span replaced by its pseudonym or redaction token. Spans must not
    overlap (as returned by :func:`client.deid.text_pii.find_pii`)."""
    action = TextAction(action)
    if action is TextAction.PSEUDONYMISE and secret is None:
        raise ValueError("pseudonymisation needs the site secret")
    pieces, pos = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < pos:
            raise ValueError("spans overlap")
        pieces.append(text[pos : span.start])
        value = text[span.start : span.end]
        if action is TextAction.PSEUDONYMISE:
            assert secret is not None
            pieces.append(pseudonym_for(value, span.pii_type, secret))
        else:
            pieces.append(redaction_token(span.pii_type))
        pos = span.end
    pieces.append(text[pos:])
    return "".join(pieces)
