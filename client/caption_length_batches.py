"""A batch split by caption length, each part cut to the longest caption it holds.

Captions are padded to the tokenizer's ``max_len`` (12), but most are much shorter: on the
built-in benchmark a single item's caption has 1-5 words (stopwords dropped) and only the
two-item scenes reach 9-12. Padding positions cost as much as words in every text layer and
in the cross-attention, yet they change nothing: the model masks them as keys, multiplies
their scores by zero and divides by the count of real tokens, so their gradients are exactly
zero. Cutting a batch's token tensor to its longest caption therefore gives the same scores
and the same gradients; splitting the batch first by each example's longest candidate
caption (so that one scene does not pad a whole batch of short captions to 12) makes the cut
deep. Examples are independent (the loss is per-example), so the parts' losses, per-example
gradients and clipped sums add up to the whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedmm.common.tokenizer import PAD_ID

#: Upper bounds of the length groups (the last group takes the rest): on the benchmark's
#: batches this split was the fastest of those measured (``dp_throughput``).
LENGTH_BOUNDS = (4, 6)


@dataclass(frozen=True)
class CaptionLengthBatch:
    """Examples ``indices`` of a batch: their images and their candidate tokens cut to the
    longest caption among them."""

    indices: torch.Tensor
    images: torch.Tensor
    tokens: torch.Tensor


def caption_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Each example's longest candidate caption in tokens, ``(B,)``, at least 1 (the model
    attends from position 0 even in an empty caption)."""
    real = tokens != PAD_ID
    positions = torch.arange(1, tokens.shape[-1] + 1)
    return (real * positions).amax(dim=(-1, -2)).clamp(min=1)


def split_by_caption_length(
    images: torch.Tensor,
    tokens: torch.Tensor,
    bounds: tuple[int, ...] = LENGTH_BOUNDS,
) -> list[CaptionLengthBatch]:
    """The examples of ``images`` ``(B, H, W)`` and ``tokens`` ``(B, C, T)`` in groups of
    longest caption <= each bound and the rest, each group's tokens cut to its longest
    caption; empty groups are left out."""
    lengths = caption_lengths(tokens)
    batches = []
    lower = 0
    for upper in (*bounds, tokens.shape[-1]):
        indices = torch.nonzero((lengths > lower) & (lengths <= upper)).flatten()
        lower = upper
        if len(indices) == 0:
            continue
        cut = int(lengths[indices].max())
        batches.append(
            CaptionLengthBatch(indices, images[indices], tokens[indices][..., :cut].contiguous())
        )
    return batches


#: A batch: the model's inputs, stacked (``(images, candidate tokens)`` for the built-in
#: matcher, ``(image features, text features, validity)`` for the fusion head).
Batch = tuple[torch.Tensor, ...]
#: How a batch is cut into parts whose per-example losses add up to the batch's.
BatchParts = Callable[[Batch], list[Batch]]


def caption_length_parts(batch: Batch) -> list[Batch]:
    """``(images, tokens)`` split by caption length (``client.caption_length_batches``)."""
    images, tokens = batch
    return [(part.images, part.tokens) for part in split_by_caption_length(images, tokens)]


def whole_batch(batch: Batch) -> list[Batch]:
    """The batch as one part (none when it is empty)."""
    return [batch] if len(batch[0]) else []
