"""A refusal reaches the coordinator as a code only; the detail stays at the site."""

from __future__ import annotations

from fedmm.common.site_refusal import (
    RefusalCode,
    SiteRefusal,
    refusal_code_of,
    status_payload,
)


def test_status_payload_carries_the_code_and_no_detail() -> None:
    refusal = SiteRefusal(RefusalCode.PRIVACY_BUDGET, "2.994 of epsilon 3 spent, /data/site")
    payload = status_payload(refusal)
    assert payload == {"refused": True, "code": "privacy-budget"}
    assert not any("2.994" in str(value) or "/data" in str(value) for value in payload.values())
    assert refusal_code_of(payload) == "privacy-budget"


def test_an_accepted_reply_has_no_code() -> None:
    assert refusal_code_of(status_payload(None)) is None
    assert refusal_code_of(None) is None


def test_an_unknown_or_free_text_code_is_not_passed_on() -> None:
    assert refusal_code_of({"refused": True, "code": "my file /etc/x is broken"}) == "unknown"
    assert refusal_code_of({"refused": True}) == "unknown"
