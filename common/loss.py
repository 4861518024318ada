"""The per-example matching loss: a record's caption against public distractors.

Each record is scored against ``1 + K`` captions: its own (index 0) and ``K`` distractors
that are word swaps of that same caption with public word lists, or captions of the run's
public caption bank (``common.distractors``). The loss is the cross-entropy of picking the
true caption. It is per-example: an example's loss, and so its gradient, depends on that
example alone. In-batch contrastive losses (CLIP) use other records as negatives and break
DP-SGD's per-example clipping argument; this loss does not, and ranking captions is also
exactly what evaluation measures.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional

from fedmm.common.data.captions import FASHION_LEXICON, PhraseLexicon, distractor_captions
from fedmm.common.tokenizer import HashingTokenizer


def candidate_tokens(
    caption: str,
    *,
    num_distractors: int,
    tokenizer: HashingTokenizer,
    rng: np.random.Generator,
    lexicon: PhraseLexicon = FASHION_LEXICON,
) -> np.ndarray:
    """Token ids ``(1 + num_distractors, T)``: the caption first, then its distractors
    from ``lexicon`` swaps alone (the built-in benchmark's draws;
    ``common.distractors.DistractorSampler`` adds word lists and a caption bank)."""
    distractors = distractor_captions(caption, count=num_distractors, rng=rng, lexicon=lexicon)
    return tokenizer.encode_batch([caption, *distractors])


def matching_loss(scores: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``(B,)`` for scores ``(B, C)`` whose true caption is column 0."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return functional.cross_entropy(scores, target, reduction="none")
