"""A word-level hashing tokenizer with no learned vocabulary.

A vocabulary learned at a site would leak that site's rare words (names, say) to everyone
who receives the model. Here a word's id is a public function of the word alone: a keyless
BLAKE2b hash folded into a fixed number of buckets (the "hashing trick", Weinberger et al.,
ICML 2009). Nothing about the tokenizer depends on any data.

Its two sizes are the model's (``ModelConfig.vocab_buckets``, ``ModelConfig.max_len``, run
config ``model-vocab-buckets`` and ``model-caption-words``): build it with
:meth:`HashingTokenizer.for_model`. Distinct words that share a bucket look the same to the
model; :func:`bucket_collisions` lists them for a public word list such as the run's caption
bank, so an operator can see whether the bucket count is large enough.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedmm.common.model_config import ModelConfig

PAD_ID = 0
_RESERVED = 1  # id 0 is padding
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
# Articles and fillers carry no content here and would double the sequence length (cost is
# linear in it). A fixed public list: it is not learned from any data.
STOPWORDS = frozenset({"a", "an", "the", "this", "is", "of"})


def split_words(text: str) -> list[str]:
    """Lower-cased words without stopwords; ``t-shirt`` stays one word."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


@lru_cache(maxsize=65536)
def _bucket(word: str, num_buckets: int) -> int:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return _RESERVED + int.from_bytes(digest, "little") % (num_buckets - _RESERVED)


@lru_cache(maxsize=65536)
def _word_ids(text: str, num_buckets: int, max_len: int) -> tuple[int, ...]:
    """The ids of ``text``'s first ``max_len`` words, remembered: training tokenizes every
    record's caption and its distractors at every step, and their strings recur."""
    return tuple(_bucket(w, num_buckets) for w in split_words(text)[:max_len])


@dataclass(frozen=True)
class HashingTokenizer:
    """Maps text to ``max_len`` token ids in ``[0, num_buckets)``; 0 is padding."""

    num_buckets: int = 768
    max_len: int = 12

    def __post_init__(self) -> None:
        if self.num_buckets < 2 or self.max_len < 1:
            raise ValueError("num_buckets must be >= 2 and max_len >= 1")

    @classmethod
    def for_model(cls, config: ModelConfig) -> HashingTokenizer:
        """The tokenizer whose ids and length fit ``config``'s text embedding."""
        return cls(num_buckets=config.vocab_buckets, max_len=config.max_len)

    def bucket(self, word: str) -> int:
        """The id of one (lower-case) word."""
        return _bucket(word, self.num_buckets)

    def is_truncated(self, text: str) -> bool:
        """Whether ``text`` has more words than the model reads."""
        return len(split_words(text)) > self.max_len

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, truncated or padded to ``max_len`` (int64)."""
        ids = _word_ids(text, self.num_buckets, self.max_len)
        out = np.zeros(self.max_len, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """Token ids of each text, shape ``(len(texts), max_len)``."""
        if not texts:
            return np.zeros((0, self.max_len), dtype=np.int64)
        return np.stack([self.encode(t) for t in texts])


@dataclass(frozen=True)
class CollisionReport:
    """Distinct words of a text collection that share a hash bucket."""

    distinct_words: int
    colliding_words: int  # words whose bucket holds another of the words
    buckets_used: int
    num_buckets: int
    examples: tuple[tuple[str, ...], ...]  # a few groups of words sharing one bucket

    def to_dict(self) -> dict[str, object]:
        return {
            "distinct_words": self.distinct_words,
            "colliding_words": self.colliding_words,
            "buckets_used": self.buckets_used,
            "num_buckets": self.num_buckets,
            "examples": [list(group) for group in self.examples],
        }


def bucket_collisions(
    texts: Iterable[str], tokenizer: HashingTokenizer, *, max_examples: int = 5
) -> CollisionReport:
    """Which distinct words of ``texts`` the tokenizer maps to a shared bucket. Run it on
    public text only (a caption bank): the examples quote words."""
    words = sorted({word for text in texts for word in split_words(text)})
    by_bucket: dict[int, list[str]] = {}
    for word in words:
        by_bucket.setdefault(tokenizer.bucket(word), []).append(word)
    shared = [group for group in by_bucket.values() if len(group) > 1]
    shared.sort(key=lambda group: (-len(group), group))
    return CollisionReport(
        distinct_words=len(words),
        colliding_words=sum(len(group) for group in shared),
        buckets_used=len(by_bucket),
        num_buckets=tokenizer.num_buckets - _RESERVED,
        examples=tuple(tuple(group) for group in shared[:max_examples]),
    )
