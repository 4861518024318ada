"""Synthetic personal data in the benchmark's training captions: deterministic, appended
after the item words, harmless to distractors, absent from what evaluation uses."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.common.data.benchmark import benchmark_test_set, benchmark_train_records
from fedmm.common.data.captions import (
    CLASS_NAMES,
    FASHION_LEXICON,
    SCENE_TEMPLATES,
    SYNONYMS,
    canonical_caption,
    distractor_captions,
)
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.data.synthetic_pii import (
    DEFAULT_PII_FRACTION,
    add_synthetic_personal_data,
    synthetic_personal_data,
)
from fedmm.common.tokenizer import split_words

needs_benchmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)


def test_generation_is_deterministic_and_takes_the_asked_share() -> None:
    first = synthetic_personal_data(2000, fraction=0.1, seed=7)
    assert first == synthetic_personal_data(2000, fraction=0.1, seed=7)
    assert first != synthetic_personal_data(2000, fraction=0.1, seed=8)
    assert len(first) == 200
    assert [x.index for x in first] == sorted({x.index for x in first})
    for item in first:
        assert item.suffix.startswith(", ") and item.values
        assert all(value in item.suffix for value in item.values)
    assert synthetic_personal_data(2000, fraction=0.0) == []
    with pytest.raises(ValueError, match="pii fraction"):
        synthetic_personal_data(10, fraction=1.5)


def test_every_kind_of_value_is_drawn() -> None:
    suffixes = " ".join(x.suffix for x in synthetic_personal_data(1000, seed=0))
    for marker in ("@example.", "555-01", "+44 20 7946 0", "SSN ", "card ", "http", "192.0.2."):
        assert marker in suffixes, marker


def test_suffixes_are_appended_to_the_chosen_captions_only() -> None:
    captions = [f"a photo of a tee number {i}" for i in range(300)]
    out = add_synthetic_personal_data(captions, fraction=0.2, seed=1)
    chosen = {x.index for x in synthetic_personal_data(300, fraction=0.2, seed=1)}
    for i, (before, after) in enumerate(zip(captions, out, strict=True)):
        assert (after != before) == (i in chosen)
        assert after.startswith(before)


@needs_benchmark
def test_benchmark_captions_keep_their_items_and_distractors_work() -> None:
    clean = benchmark_train_records(None, pii_fraction=0.0)
    with_pii = benchmark_train_records(None)
    assert np.array_equal(clean.images, with_pii.images)
    assert np.array_equal(clean.labels, with_pii.labels)
    changed = [
        i for i, (a, b) in enumerate(zip(clean.captions, with_pii.captions, strict=True)) if a != b
    ]
    assert len(changed) == round(DEFAULT_PII_FRACTION * len(clean))
    rng = np.random.default_rng(0)
    for i in changed:
        caption = with_pii.captions[i]
        assert caption.startswith(clean.captions[i])
        # No personal value is taken for an item phrase: the same items, at the same places.
        assert FASHION_LEXICON.mentions(caption) == FASHION_LEXICON.mentions(clean.captions[i])
    for i in changed[:500]:
        caption = with_pii.captions[i]
        suffix = caption[len(clean.captions[i]) :]
        distractors = distractor_captions(caption, count=4, rng=rng)
        assert len(set(distractors)) == 4 and caption not in distractors
        assert all(d.endswith(suffix) for d in distractors)


@needs_benchmark
def test_evaluation_captions_carry_no_personal_data() -> None:
    public = {w for group in SYNONYMS for phrase in group for w in split_words(phrase)}
    public |= {w for t in SCENE_TEMPLATES for w in split_words(t.format(a_left="", a_right=""))}
    public |= {"dark", "light"}
    test_set = benchmark_test_set(None, num_scenes=200)
    for caption in test_set.scene_captions:
        assert set(split_words(caption)) <= public, caption
    for label, name in enumerate(CLASS_NAMES):  # what caption ranking scores against
        assert canonical_caption(label) in (f"a photo of a {name}", f"a photo of an {name}")
