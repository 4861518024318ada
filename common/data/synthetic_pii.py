"""Synthetic personal data appended to a share of the built-in benchmark's captions.

Real sites' captions hold personal data ("a tee, photo by Maria Gonzalez, call ..."), so the
simulation's captions do too: a share of them get a suffix with a person's name, a phone
number, an email address, a date, a URL, an IP address, a US SSN or a payment card number.
That makes every simulated site exercise its de-identification path (``client.deid``), and
lets a test check that none of these values reaches a training batch.

Every value is synthetic and drawn with a fixed seed:

- names from Faker's person providers (``faker``, MIT, pinned in the ``deid`` extra) in 13
  Latin-script locales (Faker's ``de_DE``, ``nl_NL`` and ``ga_IE`` lists hold lowercase
  particles and made-up placeholders such as "auch Schlauchin" and are left out), always after
  a role word ("my friend", "nurse", "a seller named");
- emails at Faker's reserved example domains (RFC 2606), URLs and SSNs (outside the
  never-issued ranges) and Luhn-valid test card numbers from Faker, IPv4 addresses in the
  documentation ranges (RFC 5737);
- phone numbers in the ranges reserved for fiction: US ``555-0100`` to ``555-0199`` (NANP)
  with a real area code, UK ``020 7946 0xxx`` (Ofcom drama numbers);
- dates between 2015 and 2024 in six common formats.

The personal data is appended after the caption, so the item words (which the tokenizer
keeps first) and the distractors built from them are unchanged (no value names a clothing
item: a surname like "Sandal" is drawn again), and the evaluation's
captions (``canonical_caption``, the test set's scenes) never carry any.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from fedmm.common.data.captions import FASHION_LEXICON

#: Share of training captions that get synthetic personal data by default.
DEFAULT_PII_FRACTION = 0.1

#: Faker locales whose names are drawn (Latin script, no lowercase particles).
NAME_LOCALES: tuple[str, ...] = (
    "en_US",
    "en_GB",
    "es_ES",
    "fr_FR",
    "it_IT",
    "pt_BR",
    "pl_PL",
    "en_IN",
    "yo_NG",
    "zu_ZA",
    "sw",
    "vi_VN",
    "fil_PH",
)

#: Role words before a name, as in real captions ("worn by my friend ..."). Each ends with a
#: cue of the name finder: names that are also places ("Charlotte", "Austin Hall") are found
#: only after a cue, and this data is to exercise the path, not to measure the finder's
#: recall (docs/deidentification.md has that figure, on a labelled set).
_ROLES = ("my friend", "patient", "nurse", "colleague", "a seller named", "my partner", "coach")
_US_AREA_CODES = ("212", "312", "415", "617", "206", "303", "404", "512", "702", "305")
_CARD_TYPES = ("visa16", "mastercard", "amex", "discover")
_IP_PREFIXES = ("192.0.2.", "198.51.100.", "203.0.113.")
_DATE_FORMATS = ("%B %d, %Y", "%Y-%m-%d", "%d %B %Y", "%m/%d/%Y", "%d.%m.%Y", "%b. %d, %Y")
_FIRST_DAY, _DAYS = date(2015, 1, 1), 3652

#: Suffix templates; each ``{field}`` is one synthetic value.
PII_TEMPLATES: tuple[str, ...] = (
    ", photo by {role} {person}",
    ", photo by {role} {person}, call {phone}",
    ", worn by {role} {person} on {date}",
    ", sold by {role} {person} ({email})",
    ", contact {email} or {phone}",
    ", listed on {date} at {url}",
    ", uploaded from {ip} on {date}",
    ", owned by {role} {person}, SSN {ssn}",
    ", paid with card {card} on {date}",
    ", returned by {role} {person}, see {url}",
)


@dataclass(frozen=True)
class SyntheticPersonalData:
    """The suffix added to one caption and the personal values in it (never the role)."""

    index: int
    suffix: str
    values: tuple[str, ...]


class _ValueGenerator:
    def __init__(self, seed: int) -> None:
        try:
            from faker import Faker
        except ImportError as err:  # pragma: no cover - the deid extra is installed in CI
            raise ImportError(
                "synthetic personal data in the benchmark captions needs faker: "
                "pip install fedmm (its dependencies include faker), or pass pii_fraction=0"
            ) from err
        self.rng = np.random.default_rng([seed, 0x5049])  # "PI": a stream of its own
        self.fakers = []
        for i, locale in enumerate(NAME_LOCALES):
            fake = Faker(locale)
            fake.seed_instance(seed * 1000 + i)
            self.fakers.append(fake)
        self.en = self.fakers[0]

    def _pick(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def value(self, field: str) -> str:
        """A value for ``field`` that names no clothing item: a surname such as "Sandal" in
        a caption would be taken for an item when distractors are built."""
        for _ in range(100):
            value = self._draw(field)
            if not FASHION_LEXICON.mentions(value):
                return value
        raise RuntimeError(f"could not draw a {field} that names no item")  # pragma: no cover

    def _draw(self, field: str) -> str:
        if field == "person":
            fake = self.fakers[int(self.rng.integers(len(self.fakers)))]
            return f"{fake.first_name()} {fake.last_name()}"
        if field == "phone":
            if self.rng.random() < 0.7:
                number = f"555-01{int(self.rng.integers(100)):02d}"
                area = self._pick(_US_AREA_CODES)
                return f"({area}) {number}" if self.rng.random() < 0.5 else f"{area}-{number}"
            return f"+44 20 7946 0{int(self.rng.integers(1000)):03d}"
        if field == "email":
            return self.en.safe_email()
        if field == "date":
            day = _FIRST_DAY + timedelta(days=int(self.rng.integers(_DAYS)))
            return day.strftime(self._pick(_DATE_FORMATS))
        if field == "url":
            return self.en.url()
        if field == "ip":
            return self._pick(_IP_PREFIXES) + str(int(self.rng.integers(1, 255)))
        if field == "ssn":
            return self.en.ssn()
        if field == "card":
            digits = self.en.credit_card_number(card_type=self._pick(_CARD_TYPES))
            if len(digits) == 16 and self.rng.random() < 0.5:
                return " ".join(digits[i : i + 4] for i in range(0, 16, 4))
            return digits
        raise ValueError(f"unknown field {field!r}")


def _fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def synthetic_personal_data(
    num_captions: int, *, fraction: float = DEFAULT_PII_FRACTION, seed: int = 0
) -> list[SyntheticPersonalData]:
    """Suffixes for ``round(fraction * num_captions)`` captions chosen with ``seed``, in index
    order. Deterministic for a given Faker version (pinned)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pii fraction must be in [0, 1], got {fraction}")
    count = round(fraction * num_captions)
    if count == 0:
        return []
    generator = _ValueGenerator(seed)
    chosen = np.sort(generator.rng.permutation(num_captions)[:count])
    out = []
    for index in chosen:
        template = PII_TEMPLATES[int(generator.rng.integers(len(PII_TEMPLATES)))]
        values: dict[str, str] = {}
        for field in _fields(template):
            if field == "role":
                values[field] = generator._pick(_ROLES)
            else:
                values[field] = generator.value(field)
        personal = tuple(v for k, v in values.items() if k != "role")
        out.append(SyntheticPersonalData(int(index), template.format(**values), personal))
    return out


def add_synthetic_personal_data(
    captions: list[str], *, fraction: float = DEFAULT_PII_FRACTION, seed: int = 0
) -> list[str]:
    """``captions`` with the suffixes of :func:`synthetic_personal_data` appended."""
    out = list(captions)
    for item in synthetic_personal_data(len(captions), fraction=fraction, seed=seed):
        out[item.index] += item.suffix
    return out
