"""Finders of personal data in captions, and the targets on the committed caption set."""

from __future__ import annotations

import pytest

from fedmm.client.deid.text_pii import (
    PiiSpan,
    PiiType,
    find_dates,
    find_emails,
    find_ip_addresses,
    find_payment_cards,
    find_person_names,
    find_phone_numbers,
    find_pii,
    find_urls,
    find_us_ssns,
    luhn_valid,
    resolve_overlaps,
)
from fedmm.simulations.benchmarks.deid_benchmark import caption_figures


def _found(spans: list[PiiSpan], text: str) -> list[str]:
    return [text[s.start : s.end] for s in spans]


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("4111-1111")


def test_emails_and_urls() -> None:
    text = "Mail jane.doe+x@mail.example.org or see https://example.com/a?b=1, www.site.io."
    assert _found(find_emails(text), text) == ["jane.doe+x@mail.example.org"]
    assert _found(find_urls(text), text)[-2:] == ["https://example.com/a?b=1", "www.site.io"]


def test_payment_cards_need_prefix_and_luhn() -> None:
    text = "Cards 4111 1111 1111 1111, 3782-822463-10005; not 4111 1111 1111 1112 or 1234567890123"
    assert _found(find_payment_cards(text), text) == ["4111 1111 1111 1111", "3782-822463-10005"]


def test_us_ssns_skip_never_issued_ranges() -> None:
    text = "SSN 123-45-6789, 078 05 1120; not 000-12-3456, 666-12-3456, 912-34-5678, 123-00-4567"
    assert _found(find_us_ssns(text), text) == ["123-45-6789", "078 05 1120"]
    assert _found(find_us_ssns("ssn: 123456789"), "ssn: 123456789") == ["123456789"]


def test_ip_addresses_are_validated() -> None:
    text = "Hosts 192.168.1.10, 2001:db8::8a2e:370:7334 and 10.0.0.1. Not 999.1.1.1, v1.2.3.4.5"
    assert _found(find_ip_addresses(text), text) == [
        "192.168.1.10",
        "10.0.0.1",
        "2001:db8::8a2e:370:7334",
    ]
    assert find_ip_addresses("Meeting at 10:30:15 today") == []


def test_dates_with_a_day_but_not_a_month_or_weekday_alone() -> None:
    text = "On 2024-03-15, 15/03/2024, March 15, 2024, 3rd of May 2019 and Mar. 3"
    assert _found(find_dates(text), text) == [
        "2024-03-15",
        "15/03/2024",
        "March 15, 2024",
        "3rd of May 2019",
        "Mar. 3",
    ]
    assert find_dates("Tulips in May, markets on Monday, built in 1998, version 2.3.1") == []


def test_phone_numbers_in_national_and_international_formats() -> None:
    text = "Call (415) 555-0132, +44 20 7946 0958 or 020 7946 0958; order no. 12345."
    assert _found(find_phone_numbers(text), text) == [
        "(415) 555-0132",
        "+44 20 7946 0958",
        "020 7946 0958",
    ]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("Priya Raghunathan at her desk.", ["Priya Raghunathan"]),
        ("Dr. Okafor examining an X-ray.", ["Okafor"]),
        ("A boy named Kwame playing football.", ["Kwame"]),
        ("Grace Hopper at the console.", ["Grace Hopper"]),
        (
            "Photo of Joaquín Morales and Anneke van der Berg.",
            ["Joaquín Morales", "Anneke van der Berg"],
        ),
        ("Chukwuemeka Okafor smiling.", ["Chukwuemeka Okafor"]),
        ("Nurse Aroha Ngata adjusting a drip.", ["Aroha Ngata"]),
        ("Emily's new bicycle.", ["Emily"]),
        ("Mohammed bin Rashid Al Maktoum visiting Dubai.", ["Mohammed bin Rashid Al Maktoum"]),
        ("Will and Maria Santos at the lake.", ["Maria Santos"]),
    ],
)
def test_person_names(text: str, names: list[str]) -> None:
    assert _found(find_person_names(text), text) == names


@pytest.mark.parametrize(
    "text",
    [
        "A dog running in the park on Monday.",
        "Tourists in front of the Eiffel Tower in Paris.",
        "A pair of Nike sneakers on a wooden floor.",
        "Will you look at that sunset over the Golden Gate Bridge.",
        "Grace under pressure: a poster in a New York subway.",
        "Street art in Buenos Aires.",
        "The Louvre pyramid at dusk.",
        "Tokyo Disneyland at night.",
        "Autumn leaves in Central Park, Big Ben in the rain.",
    ],
)
def test_capitalised_words_that_are_not_names(text: str) -> None:
    assert find_person_names(text) == []


def test_find_pii_resolves_overlaps_by_type_priority() -> None:
    text = "Maria Santos (maria.santos@example.com) called +1 415 555 0132 on 2024-03-15."
    spans = find_pii(text)
    assert [(text[s.start : s.end], s.pii_type) for s in spans] == [
        ("Maria Santos", PiiType.PERSON),
        ("maria.santos@example.com", PiiType.EMAIL),
        ("+1 415 555 0132", PiiType.PHONE),
        ("2024-03-15", PiiType.DATE),
    ]
    only_email = find_pii(text, enabled={PiiType.EMAIL})
    assert [s.pii_type for s in only_email] == [PiiType.EMAIL]


def test_resolve_overlaps_keeps_higher_priority_then_longer() -> None:
    spans = [
        PiiSpan(0, 10, PiiType.PHONE, "a"),
        PiiSpan(2, 8, PiiType.PAYMENT_CARD, "b"),
        PiiSpan(12, 20, PiiType.PERSON, "c"),
        PiiSpan(12, 15, PiiType.PERSON, "d"),
    ]
    assert resolve_overlaps(spans) == [spans[1], spans[2]]


def test_caption_targets_on_the_committed_labelled_set() -> None:
    figures = caption_figures()
    assert figures["caption_min_pattern_recall"] >= 0.95
    assert figures["names_recall"] >= 0.85
    assert figures["clean_altered_share"] <= 0.05


def test_committed_caption_set_is_what_its_generator_makes() -> None:
    import importlib.util
    import json
    import random
    from pathlib import Path

    data_dir = Path(__file__).resolve().parents[2] / "data"
    spec = importlib.util.spec_from_file_location(
        "make_pii_captions", data_dir / "make_pii_captions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = [json.loads(line) for line in (data_dir / "pii_captions.jsonl").open()]
    assert module.generate(random.Random(module.SEED)) == committed
    for record in committed:
        for entity in record["entities"]:
            assert 0 <= entity["start"] < entity["end"] <= len(record["text"])
