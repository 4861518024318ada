"""Local training at a site: DP-SGD with Opacus, or plain SGD when DP is off.

DP-SGD (Abadi et al., CCS 2016) with Opacus' per-example gradients and clipping (Yousefpour
et al., 2021): Poisson sampling of each batch (every record independently with rate q),
per-example gradient clipping to ``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm``, both drawn from a CSPRNG (``client.secure_dp_sgd``).
The sampling rate, the steps and the expected batch follow from ``DPSGDSettings.record_count``
(a site passes its noisy, accounted record count). The RDP accountant's history is passed in
and returned, so epsilon accumulates over every round the site takes part in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedmm.client.caption_length_batches import BatchParts, caption_length_parts
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.distractors import DistractorSampler, DistractorSettings
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.secure_random import RandomBytes, fresh_random_bytes
from fedmm.common.tokenizer import HashingTokenizer

logger = logging.getLogger(__name__)

AccountantHistory = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


@dataclass(frozen=True)
class TrainingRecipe:
    """How a site trains locally in one round."""

    local_epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 0.5
    momentum: float = 0.0
    optimizer: str = "sgd"  # "sgd" or "adam"
    num_distractors: int = 4
    seed: int = 0
    #: word lists and caption bank of the distractors (common.distractors)
    distractors: DistractorSettings = field(default_factory=DistractorSettings)

    @classmethod
    def from_settings(cls, settings: Any, *, seed: int) -> TrainingRecipe:
        """The recipe named by any object with the same fields (a ``TrainRequest``, a
        ``FederationConfig``, a shadow run's recipe), with this ``seed``; its distractor
        settings (a train request's caption bank checked against its digest) when it has
        them."""
        names = ("local_epochs", "batch_size", "learning_rate", "momentum", "optimizer")
        distractor_settings = getattr(settings, "distractor_settings", None)
        return cls(
            **{name: getattr(settings, name) for name in names},
            num_distractors=settings.num_distractors,
            seed=seed,
            distractors=distractor_settings() if distractor_settings else DistractorSettings(),
        )


@dataclass(frozen=True)
class DPSGDSettings:
    """The noise and clipping of DP-SGD, and the record count its sampling follows.

    ``record_count`` sets the Poisson rate q = 1 / ceil(count / batch), the steps per epoch
    ceil(count / batch) and the expected batch q * count. A site passes its noisy record
    count, so that none of these is a function of its true count; ``None`` uses the true
    count (only where the count is public, e.g. a centralised reference run).
    """

    noise_multiplier: float
    max_grad_norm: float
    record_count: int | None = None


@dataclass(frozen=True)
class LocalTrainingResult:
    num_examples: int
    mean_loss: float
    steps: int
    accountant_history: AccountantHistory


class MatchingDataset(Dataset):
    """Items ``(image uint8 (H, W[, 3]), candidate tokens (C, T))`` with fresh distractors
    (``common.distractors``: public word swaps and caption bank, never another record)."""

    def __init__(
        self,
        data: ImageTextDataset,
        *,
        tokenizer: HashingTokenizer,
        num_distractors: int,
        seed: int,
        distractors: DistractorSettings | None = None,
    ) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.num_distractors = num_distractors
        self.sampler = DistractorSampler(
            distractors or DistractorSettings(),
            tokenizer=tokenizer,
            num_distractors=num_distractors,
        )
        self.sampler.check_captions(data.captions)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.sampler.candidate_tokens(self.data.captions[index], self.rng)
        return torch.from_numpy(self.data.images[index]), torch.from_numpy(tokens)


def check_distractors(
    data: ImageTextDataset,
    distractors: DistractorSettings,
    *,
    tokenizer: HashingTokenizer,
    num_distractors: int,
) -> None:
    """Raise ``DistractorError`` (a ``ValueError``) when some caption of ``data`` cannot get
    its distractors from ``distractors``: checked before a round spends any privacy."""
    DistractorSampler(
        distractors, tokenizer=tokenizer, num_distractors=num_distractors
    ).check_captions(data.captions)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate of one step, as Opacus derives it from the data loader."""
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def make_optimizer(model: torch.nn.Module, recipe: TrainingRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=recipe.learning_rate, momentum=recipe.momentum
        )
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {recipe.optimizer!r}")


def _run_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_parts: BatchParts,
) -> tuple[float, int]:
    total_loss, total_items, steps = 0.0, 0, 0
    for _ in range(epochs):
        for batch in loader:
            batch = tuple(batch)
            optimizer.zero_grad(set_to_none=True)
            # The batch mean, accumulated over its parts (for the built-in matcher, groups
            # cut to their longest caption: the same gradient, less padding,
            # client.caption_length_batches).
            for part in batch_parts(batch):
                losses = matching_loss(model(*part))
                (losses.sum() / len(batch[0])).backward()
                total_loss += float(losses.detach().sum())
            optimizer.step()
            total_items += len(batch[0])
            steps += 1
    return total_loss / max(total_items, 1), steps


def train_locally(
    model: CrossAttentionMatcher,
    data: ImageTextDataset,
    *,
    recipe: TrainingRecipe,
    dp: DPSGDSettings | None,
    accountant_history: AccountantHistory,
    tokenizer: HashingTokenizer | None = None,
    random_bytes: RandomBytes | None = None,
) -> LocalTrainingResult:
    """Train ``model`` in place on ``data``; DP-SGD when ``dp`` is given.

    Under DP every random draw (Poisson batches, noise, the distractors' seed) comes from
    ``random_bytes`` (default: a fresh AES-CTR keystream keyed by ``os.urandom``), never from
    torch's global generator or the request's ``seed``, which the coordinator chooses: seeded
    from it, the noise could be replayed and subtracted from the update. Without DP the run
    is reproducible from ``recipe.seed``.
    """
    if len(data) == 0:
        raise ValueError("a site with no records cannot train")
    tokenizer = tokenizer or HashingTokenizer.for_model(model.config)

    def dataset_for(seed: int) -> Dataset:
        return MatchingDataset(
            data,
            tokenizer=tokenizer,
            num_distractors=recipe.num_distractors,
            seed=seed,
            distractors=recipe.distractors,
        )

    return train_on_dataset(
        model,
        dataset_for,
        num_records=len(data),
        recipe=recipe,
        dp=dp,
        accountant_history=accountant_history,
        random_bytes=random_bytes,
    )


def train_on_dataset(
    model: torch.nn.Module,
    dataset_for: Callable[[int], Dataset],
    *,
    num_records: int,
    recipe: TrainingRecipe,
    dp: DPSGDSettings | None,
    accountant_history: AccountantHistory,
    random_bytes: RandomBytes | None = None,
    batch_parts: BatchParts | None = None,
) -> LocalTrainingResult:
    """Train ``model`` in place on the dataset ``dataset_for(seed)`` builds (its items are
    the model's inputs; ``seed`` seeds its distractor draws), as :func:`train_locally`
    describes; ``batch_parts`` cuts a batch into parts (default: by caption length)."""
    parts = batch_parts or caption_length_parts
    optimizer = make_optimizer(model, recipe)
    model.train()
    if dp is None:
        torch.manual_seed(recipe.seed)
        loader = DataLoader(dataset_for(recipe.seed), batch_size=recipe.batch_size, shuffle=True)
        mean_loss, steps = _run_epochs(model, loader, optimizer, recipe.local_epochs, parts)
        return LocalTrainingResult(num_records, mean_loss, steps, list(accountant_history))

    from fedmm.client.secure_dp_sgd import (
        train_dp_sgd,
    )  # heavy import, only where DP training happens

    stream = random_bytes or fresh_random_bytes()
    dataset = dataset_for(int.from_bytes(stream(8), "little"))
    count = dp.record_count if dp.record_count is not None else num_records
    rate = sample_rate(count, recipe.batch_size)
    steps = recipe.local_epochs * steps_per_epoch(count, recipe.batch_size)
    mean_loss, history = train_dp_sgd(
        model,
        dataset,
        optimizer=optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=rate,
        steps=steps,
        expected_batch_size=rate * count,
        accountant_history=accountant_history,
        random_bytes=stream,
        batch_parts=parts,
    )
    return LocalTrainingResult(num_records, mean_loss, steps, history)
