"""Captions for the built-in benchmark, and per-record distractor captions for training.

Captions name Fashion-MNIST items with several templates and synonyms, add a brightness
attribute where the image shows it clearly, and describe two-item scenes by position
("a sandal on the left and a bag on the right"), so the text has to be grounded in image
regions. Everything here is public: class names, synonyms and templates are fixed lists.

Distractors are built from one record's own caption by swapping item phrases for other
items' synonyms, or swapping the positions of two items. They depend on that record alone
(and public word lists), which keeps the matching loss per-example (see ``common.loss``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top"),
    ("trousers", "pants", "slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown", "frock"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "flip-flop", "strappy sandal"),
    ("shirt", "blouse", "button-down"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "bootie"),
)

SINGLE_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_item}",
    "{a_item}",
    "this is {a_item}",
    "an image of {a_item}",
    "{a_item} on a black background",
    "a picture showing {a_item}",
    "a product photo of {a_item}",
    "a close-up of {a_item}",
)

SCENE_TEMPLATES: tuple[str, ...] = (
    "{a_left} on the left and {a_right} on the right",
    "{a_right} on the right and {a_left} on the left",
    "on the left {a_left}, on the right {a_right}",
    "{a_left} to the left of {a_right}",
    "{a_right} to the right of {a_left}",
)

DARK_BELOW = 110.0
LIGHT_ABOVE = 195.0
_FOREGROUND = 30


def with_article(phrase: str) -> str:
    """``phrase`` preceded by "a" or "an"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def brightness_attribute(image: np.ndarray) -> str | None:
    """ "dark" or "light" where the item's mean foreground intensity is clearly so."""
    foreground = image > _FOREGROUND
    if not foreground.any():
        return None
    mean = float(image[foreground].mean())
    if mean < DARK_BELOW:
        return "dark"
    if mean > LIGHT_ABOVE:
        return "light"
    return None


def canonical_caption(label: int) -> str:
    """The caption used to rank classes at evaluation: "a photo of a <class>"."""
    return f"a photo of {with_article(CLASS_NAMES[label])}"


def _item_phrase(label: int, image: np.ndarray, rng: np.random.Generator) -> str:
    name = SYNONYMS[label][rng.integers(len(SYNONYMS[label]))]
    attribute = brightness_attribute(image)
    if attribute is not None and rng.random() < 0.5:
        name = f"{attribute} {name}"
    return with_article(name)


def single_caption(label: int, image: np.ndarray, rng: np.random.Generator) -> str:
    """A varied caption for one item."""
    template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
    return template.format(a_item=_item_phrase(label, image, rng))


def scene_caption(
    left: tuple[int, np.ndarray], right: tuple[int, np.ndarray], rng: np.random.Generator
) -> str:
    """A caption naming both items of a two-item scene and their positions."""
    template = SCENE_TEMPLATES[rng.integers(len(SCENE_TEMPLATES))]
    return template.format(
        a_left=_item_phrase(left[0], left[1], rng), a_right=_item_phrase(right[0], right[1], rng)
    )


@dataclass(frozen=True)
class PhraseLexicon:
    """Groups of interchangeable public phrases (one group per class)."""

    groups: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        phrases = sorted(
            {(p, g) for g, group in enumerate(self.groups) for p in group},
            key=lambda pg: -len(pg[0]),
        )
        pattern = "|".join(re.escape(p) for p, _ in phrases)
        object.__setattr__(self, "_group_of", {p: g for p, g in phrases})
        object.__setattr__(
            self, "_pattern", re.compile(rf"(?<![\w-])(?:{pattern})(?![\w-])", re.IGNORECASE)
        )

    def mentions(self, caption: str) -> list[tuple[int, int, int]]:
        """``(start, end, group)`` of each phrase found in ``caption``, left to right."""
        return [
            (m.start(), m.end(), self._group_of[m.group(0).lower()])  # type: ignore[attr-defined]
            for m in self._pattern.finditer(caption)  # type: ignore[attr-defined]
        ]


FASHION_LEXICON = PhraseLexicon(SYNONYMS)
_SIDES = re.compile(r"\b(left|right)\b")


def _replace(caption: str, spans: list[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for start, end, text in sorted(spans):
        out.append(caption[last:start])
        out.append(text)
        last = end
    out.append(caption[last:])
    return "".join(out)


def distractor_captions(
    caption: str,
    *,
    count: int,
    rng: np.random.Generator,
    lexicon: PhraseLexicon = FASHION_LEXICON,
) -> list[str]:
    """``count`` captions that differ from ``caption`` in what or where the items are.

    Uses only ``caption`` itself and the public ``lexicon``: item phrases are replaced by
    phrases of another group, or, for two-item captions, "left" and "right" are swapped.
    A caption that mentions no known phrase gets public template captions instead.
    """
    mentions = lexicon.mentions(caption)
    groups = lexicon.groups
    out: list[str] = []
    attempts = 0
    while len(out) < count and attempts < 20 * count:
        attempts += 1
        if not mentions:
            group = groups[rng.integers(len(groups))]
            candidate = f"a photo of {with_article(group[rng.integers(len(group))])}"
        elif len(mentions) >= 2 and rng.random() < 0.3 and _SIDES.search(caption):
            candidate = _SIDES.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)
        else:
            start, end, group_id = mentions[rng.integers(len(mentions))]
            other = int(rng.integers(len(groups) - 1))
            other += other >= group_id
            phrase = groups[other][rng.integers(len(groups[other]))]
            candidate = _replace(caption, [(start, end, phrase)])
            candidate = re.sub(r"\ba(?= [aeiou])", "an", candidate)
            candidate = re.sub(r"\ban(?= [^aeiou\s])", "a", candidate)
        if candidate != caption and candidate not in out:
            out.append(candidate)
    while len(out) < count:  # tiny lexicons: allow repeats rather than fail
        out.append(out[-1] if out else "a photo")
    return out
