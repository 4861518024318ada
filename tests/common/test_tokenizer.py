"""The hashing tokenizer: sizes from the model config, collisions reported on public text."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer, bucket_collisions, split_words

WORDS = Path("/usr/share/dict/american-english-small")  # Debian wamerican-small (.ci/setup)


def test_tokenizer_takes_its_sizes_from_the_model_config() -> None:
    tokenizer = HashingTokenizer.for_model(ModelConfig(vocab_buckets=4096, max_len=24))
    assert (tokenizer.num_buckets, tokenizer.max_len) == (4096, 24)
    ids = tokenizer.encode("one two three " * 10)
    assert ids.shape == (24,) and ids.min() >= 1 and ids.max() < 4096
    assert tokenizer.is_truncated("w " * 25) and not tokenizer.is_truncated("the w " * 24)


@pytest.mark.skipif(not WORDS.exists(), reason="needs Debian's wamerican-small")
def test_collisions_are_the_words_that_share_a_bucket() -> None:
    words = [w for w in WORDS.read_text().split() if w.isascii() and w.isalpha() and w.islower()][
        :3000
    ]
    tokenizer = HashingTokenizer(num_buckets=768)
    report = bucket_collisions([" ".join(words)], tokenizer)

    distinct = sorted({w for w in words if split_words(w) == [w]})
    buckets = {}
    for word in distinct:
        buckets.setdefault(tokenizer.encode(word)[0], []).append(word)
    assert report.distinct_words == len(distinct)
    assert report.buckets_used == len(buckets) <= 767
    assert report.colliding_words == sum(len(g) for g in buckets.values() if len(g) > 1)
    assert report.colliding_words > 2000  # 3,000 words in 767 buckets: most share one
    for group in report.examples:
        assert len({tokenizer.encode(w)[0] for w in group}) == 1 and len(group) > 1

    wider = bucket_collisions([" ".join(words)], HashingTokenizer(num_buckets=2**20))
    assert wider.colliding_words < 40  # about n^2 / 2B = 4.3 expected pairs
    assert wider.to_dict()["num_buckets"] == 2**20 - 1
