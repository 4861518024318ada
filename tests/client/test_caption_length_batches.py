"""Splitting a batch by caption length and cutting the padding changes no score or gradient.

On benchmark batches (short single-item captions and long two-item scenes), for every image
encoder: each example's score and each example's gradient from the cut groups equal those
from the whole padded batch, and the groups cover every example once. A control shows the
check would see a cut that drops a real token.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedmm.client.caption_length_batches import caption_lengths, split_by_caption_length
from fedmm.client.per_example_gradients import PerExampleGradients
from fedmm.client.training import MatchingDataset
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ACTIVATIONS, IMAGE_ENCODERS, ModelConfig
from fedmm.common.tokenizer import HashingTokenizer

VARIANTS = tuple(itertools.product(IMAGE_ENCODERS, ACTIVATIONS))
CONFIG = ModelConfig(width=16, heads=2)
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 benchmark records with 4 distractors each; single items and scenes."""
    data = benchmark_train_records().subset(np.arange(64))
    dataset = MatchingDataset(data, tokenizer=HashingTokenizer(), num_distractors=4, seed=1)
    items = [dataset[i] for i in range(len(data))]
    return torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])


def test_groups_cover_the_batch_once_and_are_cut_to_their_longest_caption(batch) -> None:
    images, tokens = batch
    parts = split_by_caption_length(images, tokens)
    lengths = caption_lengths(tokens)
    assert int(lengths.min()) <= 4 and int(lengths.max()) >= 9  # short items and scenes
    assert len(parts) >= 2
    covered = torch.cat([part.indices for part in parts])
    assert sorted(covered.tolist()) == list(range(len(images)))
    for part in parts:
        assert part.tokens.shape[-1] == int(lengths[part.indices].max())
        assert torch.equal(part.images, images[part.indices])
        assert torch.equal(part.tokens, tokens[part.indices][..., : part.tokens.shape[-1]])
        assert not bool(tokens[part.indices][..., part.tokens.shape[-1] :].any())  # only padding
    # Most of the batch is cut deep: the padding the model no longer runs.
    kept = sum(part.tokens.numel() for part in parts)
    assert kept < 0.6 * tokens.numel()


@pytest.mark.parametrize(("encoder", "activation"), VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_scores_and_per_example_gradients_equal_the_padded_batch(
    batch, encoder: str, activation: str
) -> None:
    images, tokens = batch
    torch.manual_seed(0)
    model = CrossAttentionMatcher(replace(CONFIG, image_encoder=encoder, activation=activation))
    weights = torch.rand(len(images), generator=torch.Generator().manual_seed(2)).double()
    with PerExampleGradients(model) as tape:
        full_scores = model(images, tokens)
        tape.backward(matching_loss(full_scores))
        full_scores = full_scores.detach()
        full_norms = tape.squared_norms(torch.float64)
        full_sums = tape.weighted_sums(weights)
        norms = torch.zeros_like(full_norms)
        sums = {name: torch.zeros_like(s) for name, s in full_sums.items()}
        for part in split_by_caption_length(images, tokens):
            scores = model(part.images, part.tokens)
            torch.testing.assert_close(scores, full_scores[part.indices], rtol=RTOL, atol=ATOL)
            tape.backward(matching_loss(scores))
            norms[part.indices] = tape.squared_norms(torch.float64)
            for name, s in tape.weighted_sums(weights[part.indices]).items():
                sums[name] += s
    torch.testing.assert_close(norms, full_norms, rtol=RTOL, atol=ATOL)
    for name in full_sums:
        torch.testing.assert_close(sums[name], full_sums[name], rtol=RTOL, atol=ATOL, msg=name)


def test_control_a_cut_into_real_tokens_changes_the_scores(batch) -> None:
    images, tokens = batch
    torch.manual_seed(0)
    model = CrossAttentionMatcher(CONFIG)
    long = caption_lengths(tokens) >= 9
    with torch.no_grad():
        full = model(images[long], tokens[long])
        cut = model(images[long], tokens[long][..., :8])
    assert not torch.allclose(full, cut, rtol=RTOL, atol=ATOL)
