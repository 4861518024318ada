"""Distractors for any caption: public word swaps and caption-bank draws, never the record's
own caption, never another record; the benchmark's draws unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.client.training import MatchingDataset
from fedmm.common.data.caption_bank import CaptionBank, CaptionBankError
from fedmm.common.data.captions import distractor_captions
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.word_lists import (
    all_swapped_captions,
    lexicons_of,
    parse_word_lists,
    swapped_word_captions,
)
from fedmm.common.distractors import DistractorError, DistractorSampler, DistractorSettings
from fedmm.common.tokenizer import HashingTokenizer

TOKENIZER = HashingTokenizer(max_len=12)
BANK_CAPTIONS = [
    "left lower lobe consolidation",  # the record's own caption, as another site wrote it
    "Left lower lobe consolidation.",  # the same to the model: case and punctuation
    "the left lower lobe of consolidation",  # the same to the model: stopwords
    "a red apple",
    "stick man waving",
    "flag of brazil",
    "road sign: stop",
    "a smiling sun",
    "computer icon of a printer",
    "a small sailing boat",
]
BANK = CaptionBank.from_bytes("\n".join(BANK_CAPTIONS).encode(), source="test")


def _sampler(word_lists: tuple[str, ...] = (), bank=BANK, k: int = 4) -> DistractorSampler:
    return DistractorSampler(
        DistractorSettings(word_lists=word_lists, bank=bank), tokenizer=TOKENIZER, num_distractors=k
    )


def _rows(tokens: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(row) for row in tokens]


def test_benchmark_draws_are_exactly_the_fashion_swaps_of_before() -> None:
    """No bank and the fashion list alone: the same captions from the same random stream."""
    sampler = DistractorSampler(DistractorSettings(), tokenizer=TOKENIZER, num_distractors=4)
    captions = ["a sandal on the left and a bag on the right", "a photo of a dark jumper"]
    ours, theirs = np.random.default_rng(3), np.random.default_rng(3)
    for caption in captions * 20:
        expected = TOKENIZER.encode_batch(
            [caption, *distractor_captions(caption, count=4, rng=theirs)]
        )
        assert np.array_equal(sampler.candidate_tokens(caption, ours), expected)
    assert ours.random() == theirs.random()  # and the streams stayed in step


def test_no_distractor_equals_the_caption_as_the_model_sees_it() -> None:
    """The bank holds the caption three times over (as the tokenizer sees it): none is ever
    drawn, and a record's distractors are distinct."""
    sampler = _sampler(k=6)
    caption = "left lower lobe consolidation"
    own = tuple(TOKENIZER.encode(caption))
    rng = np.random.default_rng(0)
    seen: set[tuple[int, ...]] = set()
    for _ in range(300):
        rows = _rows(sampler.candidate_tokens(caption, rng))
        assert rows[0] == own
        assert own not in rows[1:]
        assert len(set(rows)) == len(rows) == 7
        seen.update(rows[1:])
    bank_rows = {tuple(TOKENIZER.encode(c)) for c in BANK_CAPTIONS}
    assert seen == bank_rows - {own}  # every other bank caption is drawn, nothing else


def test_bank_captions_are_drawn_as_often_as_the_bank_holds_them() -> None:
    """A caption on 8 of 14 lines is the single distractor about 8 / 14 of the time."""
    lines = ["a red apple"] * 8 + ["stick man", "flag", "a sun", "a boat", "a sign", "a card"]
    bank = CaptionBank.from_bytes("\n".join(lines).encode(), source="test")
    sampler = _sampler(bank=bank, k=1)
    apple = tuple(TOKENIZER.encode("a red apple"))
    rng = np.random.default_rng(5)
    draws = [_rows(sampler.candidate_tokens("Chinese flag", rng))[1] for _ in range(2000)]
    share = sum(row == apple for row in draws) / len(draws)
    assert abs(share - 8 / 14) < 0.04  # 4 standard errors
    # the record's own caption is never drawn, however common in the bank
    own_apple = [_rows(sampler.candidate_tokens("A red apple!", rng))[1] for _ in range(300)]
    assert apple not in own_apple


def test_word_swaps_come_first_and_the_bank_fills_the_rest() -> None:
    sampler = _sampler(word_lists=("positions",), k=4)
    caption = "left lower lobe consolidation"
    swaps = {
        tuple(TOKENIZER.encode(c))
        for c in ("right lower lobe consolidation", "left upper lobe consolidation")
    }
    bank_rows = {tuple(TOKENIZER.encode(c)) for c in BANK_CAPTIONS}
    rng = np.random.default_rng(1)
    for _ in range(50):
        rows = _rows(sampler.candidate_tokens(caption, rng))[1:]
        assert set(rows[:2]) == swaps  # K // 2 = 2 swaps: both there are
        assert set(rows[2:]) <= bank_rows
        assert len(set(rows)) == 4


def test_a_caption_without_swappable_words_gets_all_its_distractors_from_the_bank() -> None:
    sampler = _sampler(word_lists=("colours", "positions"), k=5)
    rows = _rows(sampler.candidate_tokens("Chinese flag (correct)", np.random.default_rng(2)))
    bank_rows = {tuple(TOKENIZER.encode(c)) for c in BANK_CAPTIONS}
    assert set(rows[1:]) <= bank_rows and len(set(rows)) == 6


def test_colour_swaps_fix_the_article() -> None:
    swapped = swapped_word_captions(
        "a red apple", count=10, rng=np.random.default_rng(0), lexicons=lexicons_of(("colours",))
    )
    assert "an orange apple" in swapped and "a blue apple" in swapped
    assert "a red apple" not in swapped


def test_a_bank_too_small_for_the_distractors_is_refused() -> None:
    with pytest.raises(CaptionBankError, match=r"8 distinct captions.*num-distractors = 8"):
        _sampler(k=8)  # 10 lines, 3 of them one caption to the tokenizer


def test_without_a_bank_every_caption_needs_a_swappable_word() -> None:
    data = ImageTextDataset(
        images=np.zeros((3, 28, 56), np.uint8),
        captions=["a sandal", "Chinese flag (correct)", "left lower lobe consolidation"],
        labels=np.zeros(3, np.int64),
    )
    with pytest.raises(DistractorError, match=r"2 of 3 captions.*'caption-bank'"):
        MatchingDataset(data, tokenizer=TOKENIZER, num_distractors=4, seed=0)
    with_bank = MatchingDataset(
        data,
        tokenizer=TOKENIZER,
        num_distractors=4,
        seed=0,
        distractors=DistractorSettings(word_lists=("fashion", "positions"), bank=BANK),
    )
    image, tokens = with_bank[1]
    assert tokens.shape == (5, 12) and image.shape == (28, 56)


def test_without_a_bank_too_few_distinct_swaps_are_refused_before_training() -> None:
    """ "left lower lobe" swaps to "right ..." and "... upper lobe" only: two distractors of
    the four asked. The check before any spend says so (a bad request), instead of the
    site failing in the middle of its training; a bank, or two distractors, passes."""
    data = ImageTextDataset(
        images=np.zeros((2, 28, 56), np.uint8),
        captions=["left lower lobe consolidation", "a red apple on the left"],
        labels=np.zeros(2, np.int64),
    )
    positions = DistractorSettings(word_lists=("positions", "colours"))
    with pytest.raises(DistractorError, match=r"1 of 2 captions.*fewer than num-distractors = 4"):
        MatchingDataset(data, tokenizer=TOKENIZER, num_distractors=4, seed=0, distractors=positions)
    MatchingDataset(data, tokenizer=TOKENIZER, num_distractors=2, seed=0, distractors=positions)
    with_bank = DistractorSettings(word_lists=("positions", "colours"), bank=BANK)
    MatchingDataset(data, tokenizer=TOKENIZER, num_distractors=4, seed=0, distractors=with_bank)


def test_every_swap_the_check_counts_can_be_drawn() -> None:
    lexicons = lexicons_of(("colours", "positions"))
    caption = "a red apple on the left"
    every = all_swapped_captions(caption, lexicons)
    drawn = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        drawn.update(swapped_word_captions(caption, count=3, rng=rng, lexicons=lexicons))
    assert drawn == every and "a blue apple on the left" in every


def test_word_list_names_are_checked() -> None:
    assert parse_word_lists("colours, positions,colours") == ("colours", "positions")
    assert parse_word_lists("none") == () == parse_word_lists("")
    with pytest.raises(ValueError, match=r"'distractor-word-lists'.*\['shapes'\]"):
        parse_word_lists("colours,shapes")
