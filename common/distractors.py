"""Which captions a record's own caption is ranked against in the matching loss.

A record is scored against ``1 + K`` captions: its own (index 0) and ``K`` distractors. They
never come from another private record: each is either

- a word swap of the record's own caption with public word lists
  (``common.data.word_lists``: "left lower lobe" -> "right lower lobe"), where a list
  mentions a word of the caption; or
- a caption of the run's public caption bank (``common.data.caption_bank``), drawn uniformly
  without replacement for each example.

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

from common.data.caption_bank import CaptionBank, CaptionBankError
from common.data.captions import FASHION_LEXICON, distractor_captions
from common.data.word_lists import has_swappable_words, lexicons_of, swapped_word_captions
from common.tokenizer import HashingTokenizer

DEFAULT_WORD_LISTS = ("fashion",)


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
        self._bank_tokens = self._distinct_bank_tokens(settings.bank)

    def _distinct_bank_tokens(self, bank: CaptionBank | None) -> np.ndarray | None:
        if bank is None:
            return None
        tokens = np.unique(self.tokenizer.encode_batch(list(bank.captions)), axis=0)
        if len(tokens) < self.num_distractors + 1:
            raise CaptionBankError(
                f"caption bank sha256:{bank.sha256[:12]} has {len(tokens)} distinct captions "
                f"as the tokenizer sees them; num-distractors = {self.num_distractors} needs "
                f"at least {self.num_distractors + 1}: ship a larger bank or lower "
                "num-distractors"
            )
        return tokens

    @property
    def bank_tokens(self) -> np.ndarray:
        """The bank's distinct token rows ``(B, T)`` (empty without a bank)."""
        if self._bank_tokens is None:
            return np.zeros((0, self.tokenizer.max_len), dtype=np.int64)
        return self._bank_tokens

    def check_captions(self, captions: Sequence[str]) -> None:
        """Raise :class:`DistractorError` when some caption can get no distractor: no bank,
        and no word list mentions a word of it."""
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

    def candidate_tokens(self, caption: str, rng: np.random.Generator) -> np.ndarray:
        """Token ids ``(1 + K, T)``: ``caption`` first, then its ``K`` distractors."""
        if self._benchmark_draws:
            distractors = distractor_captions(
                caption, count=self.num_distractors, rng=rng, lexicon=FASHION_LEXICON
            )
            return self.tokenizer.encode_batch([caption, *distractors])
        own = self.tokenizer.encode(caption)
        rows = [own]
        swaps_wanted = self.num_distractors
        if self._bank_tokens is not None:
            swaps_wanted //= 2
        for swapped in swapped_word_captions(
            caption, count=swaps_wanted, rng=rng, lexicons=self.lexicons
        ):
            tokens = self.tokenizer.encode(swapped)
            if not any(np.array_equal(tokens, row) for row in rows):
                rows.append(tokens)
        missing = self.num_distractors + 1 - len(rows)
        if missing and self._bank_tokens is None:
            raise DistractorError(
                f"only {len(rows) - 1} of {self.num_distractors} distractors from word swaps "
                "and no caption bank: set run config 'caption-bank'"
            )
        if missing:
            rows += self._bank_draw(np.stack(rows), missing, rng)
        return np.stack(rows)

    def _bank_draw(
        self, taken: np.ndarray, count: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """``count`` bank captions whose tokens differ from every row of ``taken``."""
        bank = self._bank_tokens
        assert bank is not None
        # At most len(taken) bank rows equal a taken row (bank rows are distinct), and the
        # bank has at least K + 1 rows: drawing count + len(taken) always leaves enough.
        size = min(len(bank), count + len(taken))
        drawn = bank[rng.choice(len(bank), size=size, replace=False)]
        fresh = ~(drawn[:, None, :] == taken[None, :, :]).all(-1).any(-1)
        return list(drawn[fresh][:count])
