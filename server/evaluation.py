"""Evaluation of the global model on the held-out benchmark split.

Caption ranking: each test image is scored against the 10 canonical class captions and the
best one must be its class (comparable to classification accuracy). Retrieval: image->text
and text->image over the held-out two-item scenes; a hit is an item whose ordered pair of
classes (left, right) equals the query's, so position matters and synonyms do not.

Loss: ``eval_loss`` is the cross-entropy of that caption ranking (the true class caption
among the 10), the same kind of loss the sites train on, computed on the coordinator's own
held-out data. It is the run's loss curve: the sites' train loss, computed on their private
batches and covered by no accountant, is never sent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional

from fedmm.common.data.benchmark import BenchmarkTestSet
from fedmm.common.data.captions import CLASS_NAMES, canonical_caption
from fedmm.common.model import CrossAttentionMatcher, ImageStates
from fedmm.common.tokenizer import HashingTokenizer


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    r_at_1_i2t: float
    r_at_5_i2t: float
    r_at_1_t2i: float
    r_at_5_t2i: float
    eval_loss: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _encode_images(
    model: CrossAttentionMatcher, images: np.ndarray, batch: int = 1000
) -> ImageStates:
    parts = [
        model.encode_images(torch.from_numpy(images[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    return ImageStates(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Share of rows whose top ``k`` columns by score include a relevant one."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(relevant, top, axis=1).any(axis=1).mean())


@torch.no_grad()
def evaluate(
    model: CrossAttentionMatcher, test: BenchmarkTestSet, tokenizer: HashingTokenizer
) -> EvaluationResult:
    """Caption-ranking accuracy and scene retrieval recall of ``model``."""
    model.eval()
    class_texts = model.encode_texts(
        torch.from_numpy(
            tokenizer.encode_batch([canonical_caption(c) for c in range(len(CLASS_NAMES))])
        )
    )
    ranking = model.score_all_pairs(_encode_images(model, test.singles), class_texts)
    accuracy = float((ranking.argmax(1).numpy() == test.single_labels).mean())
    loss = float(
        functional.cross_entropy(ranking, torch.as_tensor(test.single_labels, dtype=torch.long))
    )

    scene_texts = model.encode_texts(torch.from_numpy(tokenizer.encode_batch(test.scene_captions)))
    scores = model.score_all_pairs(_encode_images(model, test.scenes), scene_texts).numpy()
    pairs = test.scene_pairs
    relevant = (pairs[:, None, :] == pairs[None, :, :]).all(-1)
    return EvaluationResult(
        accuracy=accuracy,
        r_at_1_i2t=recall_at_k(scores, relevant, 1),
        r_at_5_i2t=recall_at_k(scores, relevant, 5),
        r_at_1_t2i=recall_at_k(scores.T, relevant.T, 1),
        r_at_5_t2i=recall_at_k(scores.T, relevant.T, 5),
        eval_loss=loss,
    )
