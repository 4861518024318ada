"""Which captions a record's own caption is ranked against in the matching loss.

A record is scored against ``1 + K`` captions: its own (index 0) and ``K`` distractors. They
never come from another private record: each is either

- a word swap of the record's own caption with public word lists
  (``common.data.word_lists``: "left lower lobe" -> "right lower lobe"), where a list
  mentions a word of the caption; or
- a caption of the run's public caption bank (``common.data.caption_bank``), drawn for each
  example in proportion to how often the bank holds it, without repeats.

With a bank, ``K // 2`` distractors are word swaps when any apply and the rest come from the
bank; without one, all ``K`` are word swaps, and every caption must have a swappable word.
A distractor never equals the record's caption as the model sees it (the same token ids:
case, stopwords, punctuation and words past the model's length do not tell captions apart),
and no two distractors of a record are equal. So the draws for one record depend on its
caption, the public lists and bank, and the random stream alone, and the loss stays
per-example (DP-SGD's per-example clipping bounds each record's influence).

The built-in benchmark without a bank (word list ``fashion`` alone) draws exactly as it
always did (``common.data.captions.distractor_captions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmm.common.data.caption_bank import CaptionBank, CaptionBankError
from fedmm.common.data.captions import FASHION_LEXICON, distractor_captions
from fedmm.common.data.word_lists import (
    all_swapped_captions,
    has_swappable_words,
    lexicons_of,
    swapped_word_captions,
)
from fedmm.common.tokenizer import HashingTokenizer

DEFAULT_WORD_LISTS = ("fashion",)
_BANK_DRAW_ROUNDS = 16  # rounds of line draws before the fallback to distinct captions


class DistractorError(ValueError):
    """No valid distractors can be drawn; the message names the run-config key to change."""


@dataclass(frozen=True)
class DistractorSettings:
    """Where distractors come from: public word lists, and optionally a caption bank."""

    word_lists: tuple[str, ...] = DEFAULT_WORD_LISTS
    bank: CaptionBank | None = None


class DistractorSampler:
    """Draws the candidate captions of one record at a time."""

    def __init__(
        self,
        settings: DistractorSettings,
        *,
        tokenizer: HashingTokenizer,
        num_distractors: int,
    ) -> None:
        if num_distractors < 1:
            raise ValueError(f"num_distractors must be >= 1, got {num_distractors}")
        self.settings = settings
        self.tokenizer = tokenizer
        self.num_distractors = num_distractors
        self.lexicons = lexicons_of(settings.word_lists)
        self._benchmark_draws = settings.bank is None and settings.word_lists == ("fashion",)
        self._bank_tokens: np.ndarray | None = None  # one row per bank line
        self._distinct_tokens = np.zeros((0, tokenizer.max_len), dtype=np.int64)
        self._distinct_captions: list[str] = []
        if settings.bank is not None:
            self._bank_tokens = tokenizer.encode_batch(list(settings.bank.captions))
            self._distinct_tokens, first = np.unique(self._bank_tokens, axis=0, return_index=True)
            #: a bank line of each distinct token row (the first)
            self._distinct_captions = [settings.bank.captions[i] for i in first]
            if len(self._distinct_tokens) < num_distractors + 1:
                raise CaptionBankError(
                    f"caption bank sha256:{settings.bank.sha256[:12]} has "
                    f"{len(self._distinct_tokens)} distinct captions as the tokenizer sees "
                    f"them; num-distractors = {num_distractors} needs at least "
                    f"{num_distractors + 1}: ship a larger bank or lower num-distractors"
                )

    @property
    def bank_tokens(self) -> np.ndarray:
        """The bank's distinct token rows ``(B, T)`` (empty without a bank)."""
        return self._distinct_tokens

    def check_captions(self, captions: Sequence[str]) -> None:
        """Raise :class:`DistractorError` when some caption cannot get its distractors: no
        bank, and no word list mentions a word of it, or its word swaps give fewer than
        ``num_distractors`` captions that differ as the tokenizer sees them (words past the
        caption length, or hash collisions)."""
        if self.settings.bank is not None:
            return
        if not self.lexicons:
            raise DistractorError(
                "no caption bank and no word lists: set run config 'caption-bank' to a public "
                "caption file (or 'distractor-word-lists')"
            )
        stuck = sum(not has_swappable_words(c, self.lexicons) for c in captions)
        if stuck:
            raise DistractorError(
                f"{stuck} of {len(captions)} captions mention no word of the distractor word "
                f"lists {list(self.settings.word_lists)}, and the run has no caption bank: "
                "their loss would have nothing to rank them against. Set run config "
                "'caption-bank' to a file of public captions (one a line)"
            )
        if self._benchmark_draws:  # the benchmark's own swaps (common.data.captions)
            return
        short = [
            found
            for caption in dict.fromkeys(captions)
            if (found := self._distinct_swaps(caption)) < self.num_distractors
        ]
        if short:
            found = short[0]
            raise DistractorError(
                f"{len(short)} of {len(captions)} captions get fewer than num-distractors = "
                f"{self.num_distractors} distinct word swaps from the word lists "
                f"{list(self.settings.word_lists)} (e.g. one gets {found}), and the run has "
                "no caption bank. Set run config 'caption-bank' to a file of public captions, "
                "or lower 'num-distractors'"
            )

    def _distinct_swaps(self, caption: str) -> int:
        """How many distinct token rows, other than the caption's own, its swaps give."""
        own = self.tokenizer.encode(caption)
        rows = {
            tuple(self.tokenizer.encode(swapped))
            for swapped in all_swapped_captions(caption, self.lexicons)
        }
        rows.discard(tuple(own))
        return len(rows)

    def candidate_tokens(self, caption: str, rng: np.random.Generator) -> np.ndarray:
        """Token ids ``(1 + K, T)``: ``caption`` first, then its ``K`` distractors."""
        return self.tokenizer.encode_batch(self.candidate_captions(caption, rng))

    def candidate_captions(self, caption: str, rng: np.random.Generator) -> list[str]:
        """``caption`` first, then its ``K`` distractors, as text (what a pretrained text
        encoder reads; :meth:`candidate_tokens` hashes them)."""
        if self._benchmark_draws:
            distractors = distractor_captions(
                caption, count=self.num_distractors, rng=rng, lexicon=FASHION_LEXICON
            )
            return [caption, *distractors]
        own = self.tokenizer.encode(caption)
        rows, texts = [own], [caption]
        swaps_wanted = self.num_distractors
        if self._bank_tokens is not None:
            swaps_wanted //= 2
        for swapped in swapped_word_captions(
            caption, count=swaps_wanted, rng=rng, lexicons=self.lexicons
        ):
            tokens = self.tokenizer.encode(swapped)
            if not any(np.array_equal(tokens, row) for row in rows):
                rows.append(tokens)
                texts.append(swapped)
        missing = self.num_distractors + 1 - len(rows)
        if missing and self._bank_tokens is None:
            raise DistractorError(
                f"only {len(rows) - 1} of {self.num_distractors} distractors from word swaps "
                "and no caption bank: set run config 'caption-bank'"
            )
        if missing:
            texts += self._bank_draw(np.stack(rows), missing, rng)
        return texts

    def _bank_draw(self, taken: np.ndarray, count: int, rng: np.random.Generator) -> list[str]:
        """``count`` distinct bank captions, each line equally likely (so a caption in
        proportion to its lines), whose tokens differ from every row of ``taken``."""
        bank = self._bank_tokens
        assert bank is not None and self.settings.bank is not None
        lines = self.settings.bank.captions
        seen = {row.tobytes() for row in taken}
        out: list[str] = []
        for _ in range(_BANK_DRAW_ROUNDS):
            for line in rng.integers(len(bank), size=2 * (count + len(taken))):
                key = bank[line].tobytes()
                if key not in seen:
                    seen.add(key)
                    out.append(lines[line])
                    if len(out) == count:
                        return out
        # A bank dominated by the taken captions: finish from its distinct captions. There
        # are at least K + 1 of them, and at most 1 + K - count are taken.
        for index in rng.permutation(len(self._distinct_tokens)):
            row = self._distinct_tokens[index]
            if row.tobytes() not in seen:
                seen.add(row.tobytes())
                out.append(self._distinct_captions[index])
                if len(out) == count:
                    break
        return out
