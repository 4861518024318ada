"""DP-SGD's randomness at a site: secret from the coordinator, and empty Poisson batches.

Regression tests for two bugs in ``client.training.train_locally``:
- the noise and the Poisson sample came from torch's global RNG seeded with the request's
  ``seed``, which the coordinator chooses and knows: it could replay the noise of a run on
  dummy data of the same size and subtract it from the site's update;
- an empty Poisson batch (no records drawn) crashed Opacus' optimizer ("Per sample gradient
  is not initialized") instead of taking a noise-only step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training import DPSGDSettings, TrainingRecipe, train_locally
from common.data.benchmark import benchmark_train_records
from common.model import CrossAttentionMatcher
from common.model_config import ModelConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

CONFIG = ModelConfig(width=16, heads=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster, and much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return CrossAttentionMatcher(CONFIG).state_dict()


def update(data, initial_state, *, sigma: float | None, seed: int = 7) -> torch.Tensor:
    """The flattened update of one local round (one step: batch size = number of records)."""
    model = CrossAttentionMatcher(CONFIG)
    model.load_state_dict(initial_state)
    recipe = TrainingRecipe(batch_size=len(data), learning_rate=1.0, num_distractors=2, seed=seed)
    dp = None if sigma is None else DPSGDSettings(noise_multiplier=sigma, max_grad_norm=1.0)
    result = train_locally(model, data, recipe=recipe, dp=dp, accountant_history=[])
    assert result.steps == 1
    trained = model.state_dict()
    return torch.cat([(trained[k] - initial_state[k]).flatten() for k in initial_state])


def test_coordinator_cannot_replay_the_noise_from_the_seed_it_sent(initial_state) -> None:
    records = benchmark_train_records()
    private = records.subset(np.arange(32))
    dummy = records.subset(np.arange(1000, 1032))  # the coordinator's own data, same size

    observed = update(private, initial_state, sigma=5.0)
    # The attack: same seed on dummy data, with and without noise, gives "the noise".
    replayed_noise = update(dummy, initial_state, sigma=5.0) - update(
        dummy, initial_state, sigma=0.0
    )
    estimate = observed - replayed_noise
    truth = update(private, initial_state, sigma=0.0)  # what the noise should hide
    residual = float((estimate - truth).norm())
    noise = float((observed - truth).norm())
    assert noise > 10 * float(truth.norm())  # sigma 5 swamps one clipped step
    assert residual > 0.5 * noise, "the site's DP noise was reproducible from the seed"


def test_training_without_dp_stays_reproducible_from_the_seed(initial_state) -> None:
    data = benchmark_train_records().subset(np.arange(32))
    first = update(data, initial_state, sigma=None)
    assert torch.equal(first, update(data, initial_state, sigma=None))
    assert not torch.equal(first, update(data, initial_state, sigma=None, seed=8))


def test_empty_poisson_batches_take_a_noise_only_step() -> None:
    """8 records, expected batch 1: about a third of the 24 steps draw no record at all
    (the chance that none does is 0.66**24 < 1e-4)."""
    data = benchmark_train_records().subset(np.arange(8))
    model = CrossAttentionMatcher(CONFIG)
    recipe = TrainingRecipe(local_epochs=3, batch_size=1, learning_rate=0.1, num_distractors=2)
    result = train_locally(
        model,
        data,
        recipe=recipe,
        dp=DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        accountant_history=[],
    )
    assert result.steps == 24
    assert result.accountant_history == [(1.0, 0.125, 24)]  # every step is accounted
    assert all(torch.isfinite(p).all() for p in model.parameters())
