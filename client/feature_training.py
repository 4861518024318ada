"""A site's training and federated evaluation of the fusion head on cached features.

With frozen pretrained encoders a round runs only the trained part
(``common.pretrained.fusion_model``) on the features cached at the site
(``client.feature_cache``): DP-SGD exactly as for the built-in model (``client.training``:
Poisson sampling at the rate of the noisy record count, per-example clipping, noise from the
CSPRNG, the RDP accountant), over items ``(image tokens, candidate captions' token states,
their validity)``. A record's candidates are its own caption and ``K`` distractors drawn
from its public pool, anew for every item; the loss is the same per-example loss
(``common.loss``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmm.client.caption_length_batches import whole_batch
from fedmm.client.feature_cache import SiteFeatures
from fedmm.client.federated_evaluation import shuffled_pairing
from fedmm.client.training import (
    AccountantHistory,
    DPSGDSettings,
    LocalTrainingResult,
    TrainingRecipe,
    train_on_dataset,
)
from fedmm.common.federated_eval import EvaluationCounts, retrieval_counts
from fedmm.common.model import ImageStates
from fedmm.common.model_config import ModelConfig
from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher
from fedmm.common.pretrained.lora_adapters import build_fusion_model
from fedmm.common.secure_random import RandomBytes

#: Records encoded (and scored) per batch in evaluation.
_BATCH = 256


class FeatureMatchingDataset(Dataset):
    """Items ``(image tokens (P, D_i), candidates' states (1 + K, T, D_t), validity
    (1 + K, T))``: the record's caption first, then ``K`` distractors from its pool."""

    def __init__(self, features: SiteFeatures, *, num_distractors: int, seed: int) -> None:
        pool_sizes = (features.distractor_rows >= 0).sum(1) if len(features) else np.zeros(0)
        if len(features) and int(pool_sizes.min()) < num_distractors:
            raise ValueError(
                f"a record's cached distractor pool holds {int(pool_sizes.min())} captions, "
                f"fewer than num-distractors = {num_distractors}: the features were cached for "
                "another num-distractors (the cache key includes it; rebuild)"
            )
        self.features = features
        self.num_distractors = num_distractors
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.features)

    def candidate_rows(self, index: int) -> np.ndarray:
        pool = self.features.distractor_rows[index]
        pool = pool[pool >= 0]
        chosen = self.rng.choice(pool, size=self.num_distractors, replace=False)
        return np.concatenate([[self.features.caption_row[index]], chosen])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.candidate_rows(index)
        f = self.features
        return (
            torch.from_numpy(f.image[index].astype(np.float32)),
            torch.from_numpy(f.text[rows].astype(np.float32)),
            torch.from_numpy(f.text_valid[rows]),
        )


def train_on_features(
    model: FeatureFusionMatcher,
    features: SiteFeatures,
    *,
    recipe: TrainingRecipe,
    dp: DPSGDSettings | None,
    accountant_history: AccountantHistory,
    random_bytes: RandomBytes | None = None,
) -> LocalTrainingResult:
    """Train the fusion head in place on cached ``features``; DP-SGD when ``dp`` is given
    (every random draw from ``random_bytes``, as ``client.training.train_locally``)."""
    if len(features) == 0:
        raise ValueError("a site with no records cannot train")
    return train_on_dataset(
        model,
        lambda seed: FeatureMatchingDataset(
            features, num_distractors=recipe.num_distractors, seed=seed
        ),
        num_records=len(features),
        recipe=recipe,
        dp=dp,
        accountant_history=accountant_history,
        random_bytes=random_bytes,
        batch_parts=whole_batch,
    )


def distinct_caption_records(features: SiteFeatures) -> SiteFeatures:
    """The first record of each distinct caption (two records with the same caption cannot
    be retrieved apart: ``client.federated_evaluation.distinct_captions``)."""
    _, first = np.unique(features.caption_row, return_index=True)
    return features.subset(np.sort(first))


def _image_states(model: FeatureFusionMatcher, features: SiteFeatures) -> ImageStates:
    parts = [
        model.encode_images(torch.from_numpy(features.image[i : i + _BATCH].astype(np.float32)))
        for i in range(0, len(features), _BATCH)
    ]
    return ImageStates(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))


@torch.no_grad()
def evaluate_features(
    *,
    global_state: dict[str, torch.Tensor],
    config: ModelConfig,
    held_out: SiteFeatures,
    encoders: Any = None,
    num_distractors: int,
    with_bank: bool,
    rng: np.random.Generator | None = None,
) -> EvaluationCounts:
    """The counts of the global head on held-out records' cached features (the same counts
    as ``client.federated_evaluation.evaluate_held_out``): retrieval among the records with
    distinct captions, the shuffled control, and, when the run has a caption bank, caption
    ranking against ``num_distractors`` distractors from each record's pool. With LoRA
    adapters the held-out records' cached block inputs go through the adapted blocks of
    the global model (``encoders``: the site's frozen encoders the blocks are copied from)."""
    rng = rng if rng is not None else np.random.default_rng()
    if len(held_out) == 0:
        return EvaluationCounts()
    model = build_fusion_model(config, encoders)
    model.load_state_dict(global_state)
    model.eval()
    held_out = distinct_caption_records(held_out)
    rows = held_out.caption_row
    texts = model.encode_texts(
        torch.from_numpy(held_out.text[rows].astype(np.float32)),
        torch.from_numpy(held_out.text_valid[rows]),
    )
    scores = model.score_all_pairs(_image_states(model, held_out), texts).numpy()
    pairing = shuffled_pairing(len(held_out), rng)
    bank = (0, 0)
    if with_bank:
        dataset = FeatureMatchingDataset(
            held_out, num_distractors=num_distractors, seed=int(rng.integers(2**63))
        )
        hits = 0
        for start in range(0, len(held_out), _BATCH):
            batch = [dataset[i] for i in range(start, min(start + _BATCH, len(held_out)))]
            image, text, valid = (torch.stack(column) for column in zip(*batch, strict=True))
            candidate_scores = model(image, text, valid)
            hits += int((candidate_scores[:, 0] > candidate_scores[:, 1:].max(1).values).sum())
        bank = (hits, len(held_out))
    return retrieval_counts(scores, permutation=pairing, bank=bank)
