"""Public word lists whose words a caption's distractors swap (run config
``distractor-word-lists``).

Each list is one or more :class:`PhraseLexicon` of interchangeable groups; a distractor
replaces one phrase of a caption by a phrase of another group of the same lexicon ("left
lower lobe" -> "right lower lobe", "a red apple" -> "a blue apple"). Such near-misses make
the model look at what the words name; they use the record's own caption and the public
lists only, so they keep the loss per-example. ``fashion`` is the built-in benchmark's item
vocabulary with its left/right swap of two-item scenes (``common.data.captions``); it is used
alone exactly as the benchmark always used it.
"""

from __future__ import annotations

import re

import numpy as np

from fedmm.common.data.captions import FASHION_LEXICON, PhraseLexicon

COLOURS = PhraseLexicon(
    (
        ("red",),
        ("green",),
        ("blue",),
        ("yellow",),
        ("orange",),
        ("purple", "violet"),
        ("pink",),
        ("brown",),
        ("black",),
        ("white",),
        ("gray", "grey"),
    )
)
POSITIONS = (
    PhraseLexicon((("left",), ("right",))),
    PhraseLexicon((("top",), ("bottom",))),
    PhraseLexicon((("above",), ("below",))),
    PhraseLexicon((("upper",), ("lower",))),
    PhraseLexicon((("front",), ("back",))),
)
COUNTS = PhraseLexicon(
    (
        ("one", "1", "single"),
        ("two", "2", "pair of"),
        ("three", "3"),
        ("four", "4"),
        ("five", "5"),
        ("six", "6"),
    )
)
SIZES = PhraseLexicon((("small", "little", "tiny"), ("large", "big", "huge")))

WORD_LISTS: dict[str, tuple[PhraseLexicon, ...]] = {
    "fashion": (FASHION_LEXICON,),
    "colours": (COLOURS,),
    "positions": POSITIONS,
    "counts": (COUNTS,),
    "sizes": (SIZES,),
}


def parse_word_lists(text: str) -> tuple[str, ...]:
    """``"colours,positions"`` to ``("colours", "positions")``; ``""`` or ``"none"`` to
    ``()``. A ValueError names the run-config key and the known lists."""
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in WORD_LISTS]
    if unknown:
        raise ValueError(
            f"run config 'distractor-word-lists' names unknown list(s) {unknown}: use a "
            f"comma-separated subset of {sorted(WORD_LISTS)}, or 'none'"
        )
    return names


def lexicons_of(names: tuple[str, ...]) -> tuple[PhraseLexicon, ...]:
    """The lexicons of the named word lists, in order."""
    return tuple(lexicon for name in names for lexicon in WORD_LISTS[name])


def has_swappable_words(caption: str, lexicons: tuple[PhraseLexicon, ...]) -> bool:
    """Whether any lexicon mentions a phrase of ``caption``."""
    return any(lexicon.mentions(caption) for lexicon in lexicons)


def _with_phrase(caption: str, start: int, end: int, phrase: str) -> str:
    """``caption`` with ``[start, end)`` replaced by ``phrase``, articles fixed."""
    candidate = caption[:start] + phrase + caption[end:]
    candidate = re.sub(r"\b([aA])(?= [aeiouAEIOU])", r"\1n", candidate)
    return re.sub(r"\b([aA])n(?= [^aeiouAEIOU\s])", r"\1", candidate)


def all_swapped_captions(caption: str, lexicons: tuple[PhraseLexicon, ...]) -> set[str]:
    """Every caption :func:`swapped_word_captions` can draw for ``caption``: one mentioned
    phrase replaced by any phrase of another group of its lexicon."""
    out = set()
    for lexicon in lexicons:
        for start, end, group_id in lexicon.mentions(caption):
            for other, phrases in enumerate(lexicon.groups):
                if other == group_id:
                    continue
                for phrase in phrases:
                    candidate = _with_phrase(caption, start, end, phrase)
                    if candidate != caption:
                        out.add(candidate)
    return out


def swapped_word_captions(
    caption: str, *, count: int, rng: np.random.Generator, lexicons: tuple[PhraseLexicon, ...]
) -> list[str]:
    """Up to ``count`` distinct captions, each ``caption`` with one phrase that a lexicon
    mentions replaced by a phrase of another group of that lexicon; none when no lexicon
    mentions anything. Articles before the new phrase are fixed ("a" / "an")."""
    mentions = [
        (lexicon, start, end, group)
        for lexicon in lexicons
        for start, end, group in lexicon.mentions(caption)
    ]
    out: list[str] = []
    attempts = 0
    while mentions and len(out) < count and attempts < 20 * count:
        attempts += 1
        lexicon, start, end, group_id = mentions[rng.integers(len(mentions))]
        groups = lexicon.groups
        other = int(rng.integers(len(groups) - 1))
        other += other >= group_id
        phrase = groups[other][rng.integers(len(groups[other]))]
        candidate = _with_phrase(caption, start, end, phrase)
        if candidate != caption and candidate not in out:
            out.append(candidate)
    return out
