"""Keyed pseudonyms and redaction tokens."""

from __future__ import annotations

import hashlib
import re

import pytest

from fedmm.client.deid.pseudonymise import (
    TextAction,
    normalise_value,
    pseudonym_for,
    redaction_token,
    replace_spans,
)
from fedmm.client.deid.text_pii import PiiType, find_pii

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))


def test_pseudonym_is_typed_stable_and_keyed() -> None:
    p = pseudonym_for("Maria Santos", PiiType.PERSON, SECRET)
    assert re.fullmatch(r"<PERSON_[0-9a-f]{8}>", p)
    assert p == pseudonym_for("maria  SANTOS", PiiType.PERSON, SECRET)
    assert p != pseudonym_for("Maria Santos", PiiType.PERSON, OTHER_SECRET)
    assert p != pseudonym_for("Maria Santoz", PiiType.PERSON, SECRET)


def test_pseudonym_is_not_a_plain_hash() -> None:
    value = "maria santos"
    digest = pseudonym_for(value, PiiType.PERSON, SECRET)[len("<PERSON_") : -1]
    for plain in (value, "PERSON\x00" + value):
        assert not hashlib.sha256(plain.encode()).hexdigest().startswith(digest)


def test_type_is_part_of_the_key_material() -> None:
    a = pseudonym_for("2024", PiiType.DATE, SECRET)[len("<DATE_") : -1]
    b = pseudonym_for("2024", PiiType.PHONE, SECRET)[len("<PHONE_") : -1]
    assert a != b


def test_numbers_are_normalised_to_digits() -> None:
    assert normalise_value("(415) 555-0132", PiiType.PHONE) == "4155550132"
    assert normalise_value("+1 415 555 0132", PiiType.PHONE) == "4155550132"
    assert normalise_value("4111-1111 1111 1111", PiiType.PAYMENT_CARD) == "4111111111111111"
    same = {pseudonym_for(v, PiiType.PHONE, SECRET) for v in ("(415) 555-0132", "415.555.0132")}
    assert len(same) == 1


def test_short_secret_and_bad_digest_length_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pseudonym_for("x", PiiType.EMAIL, b"short")
    with pytest.raises(ValueError, match="digest_chars"):
        pseudonym_for("x", PiiType.EMAIL, SECRET, digest_chars=2)


def test_replace_spans_pseudonymise_and_redact() -> None:
    text = "Mail maria@example.com or call (415) 555-0132."
    spans = find_pii(text)
    redacted = replace_spans(text, spans, action=TextAction.REDACT)
    assert redacted == "Mail <EMAIL> or call <PHONE>."
    pseudonymised = replace_spans(text, spans, action="pseudonymise", secret=SECRET)
    assert re.fullmatch(r"Mail <EMAIL_[0-9a-f]{8}> or call <PHONE_[0-9a-f]{8}>\.", pseudonymised)
    assert "maria" not in pseudonymised and "555" not in pseudonymised
    assert redaction_token(PiiType.US_SSN) == "<US_SSN>"


def test_replace_spans_needs_a_secret_to_pseudonymise_and_rejects_overlaps() -> None:
    text = "maria@example.com"
    spans = find_pii(text)
    with pytest.raises(ValueError, match="site secret"):
        replace_spans(text, spans, action=TextAction.PSEUDONYMISE)
    with pytest.raises(ValueError, match="overlap"):
        replace_spans(text, spans + spans, action=TextAction.REDACT)


def test_de_identified_text_is_left_alone_on_a_second_pass() -> None:
    text = "Dr. Okafor met Maria Santos on 2024-01-02, maria@example.com"
    once = replace_spans(text, find_pii(text), action=TextAction.PSEUDONYMISE, secret=SECRET)
    assert find_pii(once) == []
    redacted = replace_spans(text, find_pii(text), action=TextAction.REDACT)
    assert find_pii(redacted) == []
