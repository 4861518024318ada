"""A word-level hashing tokenizer with no learned vocabulary.

A vocabulary learned at a site would leak that site's rare words (names, say) to everyone
who receives the model. Here a word's id is a public function of the word alone: a keyless
BLAKE2b hash folded into a fixed number of buckets (the "hashing trick", Weinberger et al.,
ICML 2009). Nothing about the tokenizer depends on any data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

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


@dataclass(frozen=True)
class HashingTokenizer:
    """Maps text to ``max_len`` token ids in ``[0, num_buckets)``; 0 is padding."""

    num_buckets: int = 768
    max_len: int = 12

    def __post_init__(self) -> None:
        if self.num_buckets < 2 or self.max_len < 1:
            raise ValueError("num_buckets must be >= 2 and max_len >= 1")

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, truncated or padded to ``max_len`` (int64)."""
        ids = [_bucket(w, self.num_buckets) for w in split_words(text)[: self.max_len]]
        out = np.zeros(self.max_len, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """Token ids of each text, shape ``(len(texts), max_len)``."""
        if not texts:
            return np.zeros((0, self.max_len), dtype=np.int64)
        return np.stack([self.encode(t) for t in texts])
