"""Shadow models for offline LiRA: the federated recipe of the target run, replayed in one
process without Flower.

Carlini et al. (LiRA, IEEE S&P 2022) train shadow models "with the same recipe" as the
target on data the attacker holds. Here that is: the same number of sites and rounds, the
same local DP-SGD at every site (``client.training.train_locally``: Poisson batches,
per-example clipping, Gaussian noise with each site's sigma calibrated by the site's own
rule, ``client.privacy_ledger.calibrate_noise_multiplier``), each update clipped entrywise
to the secure aggregation's range when the run uses it, and example-weighted FedAvg. What
is left out is only the transport: Flower messages and SecAgg+ masking (whose quantisation
error is far below the DP noise). Sites train one after the other; every site sees the
same global model in a round, as in the federated run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fedmm.client.privacy_ledger import calibrate_noise_multiplier
from fedmm.client.training import (
    DPSGDSettings,
    TrainingRecipe,
    sample_rate,
    steps_per_epoch,
    train_locally,
)
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.federation_config import FederationConfig, scheduled_learning_rate
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import model_config_of


@dataclass(frozen=True)
class FederatedRecipe:
    """What a federated run does to its sites' records, as far as the model is concerned."""

    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    learning_rate_schedule: str
    momentum: float
    optimizer: str
    num_distractors: int
    epsilon: float  # inf: no DP
    delta: float
    max_grad_norm: float
    noise_multiplier_floor: float
    server_learning_rate: float
    update_clip: float | None  # SecAgg+ clips every update entry to +-this; None: plain FedAvg
    max_weight: int | None
    model: ModelConfig

    @classmethod
    def of(cls, config: FederationConfig) -> FederatedRecipe:
        secure = config.secure_aggregation
        return cls(
            rounds=config.num_server_rounds,
            local_epochs=config.local_epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            learning_rate_schedule=config.learning_rate_schedule,
            momentum=config.momentum,
            optimizer=config.optimizer,
            num_distractors=config.num_distractors,
            epsilon=config.epsilon,
            delta=config.delta,
            max_grad_norm=config.max_grad_norm,
            noise_multiplier_floor=config.noise_multiplier_floor,
            server_learning_rate=config.server_learning_rate,
            update_clip=config.secagg_update_clip if secure else None,
            max_weight=config.secagg_max_weight if secure else None,
            model=model_config_of(config),
        )

    def site_noise(self, num_records: int) -> DPSGDSettings | None:
        """A site's DP-SGD settings for the whole run, calibrated as a site does it."""
        if not math.isfinite(self.epsilon):
            return None
        sigma = calibrate_noise_multiplier(
            epsilon=self.epsilon,
            delta=self.delta,
            sample_rate=sample_rate(num_records, self.batch_size),
            steps=self.rounds * self.local_epochs * steps_per_epoch(num_records, self.batch_size),
        )
        return DPSGDSettings(
            noise_multiplier=max(sigma, self.noise_multiplier_floor),
            max_grad_norm=self.max_grad_norm,
        )


def train_shadow_federation(
    sites: list[ImageTextDataset], recipe: FederatedRecipe, *, seed: int
) -> CrossAttentionMatcher:
    """The global model after ``recipe.rounds`` rounds of FedAvg over ``sites``."""
    sites = [data for data in sites if len(data) > 0]
    if not sites:
        raise ValueError("a shadow federation needs at least one site with records")
    torch.manual_seed(seed)
    model = CrossAttentionMatcher(recipe.model)
    tokenizer = HashingTokenizer(
        max_len=recipe.model.max_len, num_buckets=recipe.model.vocab_buckets
    )
    noise = [recipe.site_noise(len(data)) for data in sites]
    histories: list[list[tuple[float, float, int]]] = [[] for _ in sites]
    for server_round in range(1, recipe.rounds + 1):
        round_recipe = replace(
            recipe,
            learning_rate=scheduled_learning_rate(
                recipe.learning_rate,
                schedule=recipe.learning_rate_schedule,
                server_round=server_round,
                num_rounds=recipe.rounds,
            ),
        )
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        summed = {k: torch.zeros_like(v) for k, v in global_state.items()}
        total_weight = 0.0
        for index, data in enumerate(sites):
            local = CrossAttentionMatcher(recipe.model)
            local.load_state_dict(global_state)
            result = train_locally(
                local,
                data,
                recipe=TrainingRecipe.from_settings(
                    round_recipe, seed=seed * 100_003 + server_round * 1_000 + index
                ),
                dp=noise[index],
                accountant_history=histories[index],
                tokenizer=tokenizer,
            )
            histories[index] = result.accountant_history
            weight = float(
                len(data) if recipe.max_weight is None else min(len(data), recipe.max_weight)
            )
            trained = local.state_dict()
            for key, value in global_state.items():
                update = trained[key] - value
                if recipe.update_clip is not None:
                    update = update.clamp(-recipe.update_clip, recipe.update_clip)
                summed[key] += weight * update
            total_weight += weight
        model.load_state_dict(
            {
                k: v + recipe.server_learning_rate * summed[k] / total_weight
                for k, v in global_state.items()
            }
        )
    return model
