"""What an attacker reads from a model about one record: its loss and LiRA's scaled
confidence of the record's own caption.

A record is queried as training scores it (``common.loss``): its caption against ``K``
distractor captions built from that caption alone. The distractors of each query are drawn
once with a fixed seed (:func:`build_queries`), so the target model and every shadow model
answer exactly the same questions; several queries per record play the part of LiRA's
data augmentations.

Scaled confidence (Carlini et al., "Membership Inference Attacks From First Principles",
IEEE S&P 2022, Sec. IV-B): with ``p`` the softmax probability of the true caption,
``phi = log(p / (1 - p))``, computed stably from the scores ``z`` as
``z_true - logsumexp(z_distractors)``. It is close to Gaussian across models, which the
likelihood-ratio test assumes; the loss is ``-log p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.loss import candidate_tokens
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.tokenizer import HashingTokenizer


@dataclass(frozen=True)
class RecordQueries:
    """Images ``(N, H, W)`` and candidate tokens ``(N, Q, 1 + K, T)``, true caption first."""

    images: np.ndarray
    tokens: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 4 or self.tokens.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"tokens must be (N, Q, 1 + K, T) for {self.images.shape[0]} images, got "
                f"{self.tokens.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.tokens.shape[1])


def build_queries(
    records: ImageTextDataset,
    *,
    tokenizer: HashingTokenizer,
    num_distractors: int,
    num_queries: int,
    seed: int,
) -> RecordQueries:
    """``num_queries`` fixed sets of ``num_distractors`` distractors for every record."""
    if num_queries < 1 or num_distractors < 1:
        raise ValueError("num_queries and num_distractors must be at least 1")
    rng = np.random.default_rng(seed)
    tokens = np.stack(
        [
            np.stack(
                [
                    candidate_tokens(
                        caption, num_distractors=num_distractors, tokenizer=tokenizer, rng=rng
                    )
                    for _ in range(num_queries)
                ]
            )
            for caption in records.captions
        ]
    )
    return RecordQueries(images=records.images, tokens=tokens)


@dataclass(frozen=True)
class MembershipSignals:
    """Per record and query ``(N, Q)``: the loss and the scaled confidence."""

    loss: np.ndarray
    scaled_confidence: np.ndarray


@torch.no_grad()
def membership_signals(
    model: CrossAttentionMatcher, queries: RecordQueries, *, batch_size: int = 500
) -> MembershipSignals:
    """Loss and scaled confidence of every record and query under ``model`` (eval mode)."""
    model.eval()
    losses, confidences = [], []
    for start in range(0, len(queries), batch_size):
        images = torch.from_numpy(queries.images[start : start + batch_size])
        per_query_loss, per_query_phi = [], []
        for q in range(queries.num_queries):
            tokens = torch.from_numpy(queries.tokens[start : start + batch_size, q])
            scores = model(images, tokens).double()  # (B, 1 + K)
            true, others = scores[:, 0], scores[:, 1:]
            per_query_loss.append(torch.logsumexp(scores, dim=1) - true)
            per_query_phi.append(true - torch.logsumexp(others, dim=1))
        losses.append(torch.stack(per_query_loss, dim=1))
        confidences.append(torch.stack(per_query_phi, dim=1))
    return MembershipSignals(
        loss=torch.cat(losses).numpy(), scaled_confidence=torch.cat(confidences).numpy()
    )
