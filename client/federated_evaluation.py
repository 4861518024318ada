"""Federated evaluation at a site: the global model's retrieval counts on its held-out records.

The site scores every held-out image against every held-out caption with the global model
(``CrossAttentionMatcher.score_all_pairs``, the matching score the model is trained on) and
counts recall hits, the shuffled control, the chance level and, with a caption bank in the
run, caption-ranking hits against public distractors (``common.federated_eval``). The
held-out records are the site's keyed split (``client.held_out_split``): never in a training
batch, never in the released record count. Only the integer counts leave the site, inside a
SecAgg+ sum (``client.site_tasks``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.distractors import DistractorSampler
from fedmm.common.federated_eval import EvaluationCounts, retrieval_counts
from fedmm.common.model import CrossAttentionMatcher, ImageStates
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import TrainRequest

#: Images encoded (and scored) per batch.
_BATCH = 256


def shuffled_pairing(num_records: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation without fixed points (for two records or more): record i's image is
    paired with record ``out[i]``'s caption, never its own (a random cycle)."""
    order = rng.permutation(num_records)
    out = np.empty(num_records, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def _encode_images(model: CrossAttentionMatcher, images: np.ndarray) -> ImageStates:
    parts = [
        model.encode_images(torch.from_numpy(images[i : i + _BATCH]))
        for i in range(0, len(images), _BATCH)
    ]
    return ImageStates(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))


def held_out_scores(model: CrossAttentionMatcher, data: ImageTextDataset) -> np.ndarray:
    """Scores ``(N, N)``: held-out image i (row) against held-out caption j (column)."""
    tokenizer = HashingTokenizer.for_model(model.config)
    texts = model.encode_texts(torch.from_numpy(tokenizer.encode_batch(list(data.captions))))
    return model.score_all_pairs(_encode_images(model, data.images), texts).numpy()


def caption_bank_hits(
    model: CrossAttentionMatcher,
    data: ImageTextDataset,
    request: TrainRequest,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """(hits, records) of caption ranking: a hit when the record's own caption scores above
    each of its ``num-distractors`` public distractors (the training loss's candidates, from
    the run's caption bank and word lists); (0, 0) when the run has no caption bank."""
    settings = request.distractor_settings()
    if settings.bank is None or len(data) == 0:
        return 0, 0
    sampler = DistractorSampler(
        settings,
        tokenizer=HashingTokenizer.for_model(model.config),
        num_distractors=int(request.num_distractors),
    )
    hits = 0
    for start in range(0, len(data), _BATCH):
        stop = min(start + _BATCH, len(data))
        captions = data.captions[start:stop]
        tokens = np.stack([sampler.candidate_tokens(caption, rng) for caption in captions])
        scores = model(torch.from_numpy(data.images[start:stop]), torch.from_numpy(tokens))
        hits += int((scores[:, 0] > scores[:, 1:].max(dim=1).values).sum())
    return hits, len(data)


def distinct_captions(data: ImageTextDataset, tokenizer: HashingTokenizer) -> ImageTextDataset:
    """The first record of each caption as the model reads it (the same token ids): two
    records whose captions the model cannot tell apart cannot be retrieved apart, so each
    caption is one query and one candidate (the centralised check's protocol,
    ``docs/real-data.md`` section 5)."""
    first: dict[bytes, int] = {}
    for index, tokens in enumerate(tokenizer.encode_batch(list(data.captions))):
        first.setdefault(tokens.tobytes(), index)
    return data.subset(np.array(sorted(first.values()), dtype=np.int64))


@torch.no_grad()
def evaluate_held_out(
    *,
    global_state: dict[str, torch.Tensor],
    request: TrainRequest,
    held_out: ImageTextDataset,
    rng: np.random.Generator | None = None,
) -> EvaluationCounts:
    """The counts of the global model ``global_state`` on the site's ``held_out`` records
    with distinct captions (:func:`distinct_captions`). ``rng`` draws the shuffled
    control's pairing and the distractors (default: fresh)."""
    rng = rng if rng is not None else np.random.default_rng()
    if len(held_out) == 0:
        return EvaluationCounts()
    model = CrossAttentionMatcher(request.model_config())
    model.load_state_dict(global_state)
    model.eval()
    held_out = distinct_captions(held_out, HashingTokenizer.for_model(model.config))
    scores = held_out_scores(model, held_out)
    pairing = shuffled_pairing(len(held_out), rng)
    bank = caption_bank_hits(model, held_out, request, rng)
    return retrieval_counts(scores, permutation=pairing, bank=bank)
