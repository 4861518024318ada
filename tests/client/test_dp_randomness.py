"""DP-SGD's randomness at a site: secret from the coordinator, and empty Poisson batches.

Regression tests for two bugs in ``client.training.train_locally``:
- the noise and the Poisson sample came from torch's global RNG seeded with the request's
  ``seed``, which the coordinator chooses and knows: it could replay the noise of a run on
  dummy data of the same size and subtract it from the site's update;
- an empty Poisson batch (no records drawn) crashed Opacus' optimizer ("Per sample gradient
  is not initialized") instead of taking a noise-only step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedmm.client.training import DPSGDSettings, TrainingRecipe, train_locally
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.secure_random import aes_ctr_random_bytes, bernoulli_indices, standard_normals

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


def update(
    data, initial_state, *, sigma: float | None, seed: int = 7, random_bytes=None
) -> torch.Tensor:
    """The flattened update of one local round (one step: batch size = number of records)."""
    model = CrossAttentionMatcher(CONFIG)
    model.load_state_dict(initial_state)
    recipe = TrainingRecipe(batch_size=len(data), learning_rate=1.0, num_distractors=2, seed=seed)
    dp = None if sigma is None else DPSGDSettings(noise_multiplier=sigma, max_grad_norm=1.0)
    result = train_locally(
        model, data, recipe=recipe, dp=dp, accountant_history=[], random_bytes=random_bytes
    )
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


def _key(byte: int):
    return aes_ctr_random_bytes(bytes([byte]) * 32)


def test_dp_training_leaves_torch_global_generator_alone(initial_state) -> None:
    """Noise and Poisson sampling come from the CSPRNG: a DP round neither reads nor reseeds
    torch's global Mersenne Twister."""
    data = benchmark_train_records().subset(np.arange(32))
    model = CrossAttentionMatcher(CONFIG)  # initialising a model draws from torch: before
    recipe = TrainingRecipe(local_epochs=2, batch_size=8, learning_rate=1.0, num_distractors=2)
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    result = train_locally(model, data, recipe=recipe, dp=dp, accountant_history=[])
    assert result.steps == 8
    assert torch.equal(torch.get_rng_state(), state)


def test_the_update_is_a_function_of_the_csprng_stream_only(initial_state) -> None:
    """Same keystream: the same update, whatever torch's seed; another keystream: another
    update. So no draw comes from torch's (or numpy's) global generators."""
    data = benchmark_train_records().subset(np.arange(32))
    torch.manual_seed(0)
    first = update(data, initial_state, sigma=1.0, random_bytes=_key(1))
    torch.manual_seed(12345)
    again = update(data, initial_state, sigma=1.0, random_bytes=_key(1))
    torch.manual_seed(0)
    other = update(data, initial_state, sigma=1.0, random_bytes=_key(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # After torch.manual_seed(0), two trainings with fresh CSPRNG keys differ.
    torch.manual_seed(0)
    fresh = update(data, initial_state, sigma=1.0)
    torch.manual_seed(0)
    assert not torch.allclose(fresh, update(data, initial_state, sigma=1.0))


def test_box_muller_deviates_are_standard_normal() -> None:
    samples = standard_normals(200_001, _key(3))
    assert samples.shape == (200_001,) and samples.dtype == np.float64
    assert abs(samples.mean()) < 5 / math.sqrt(len(samples))
    assert abs(samples.var() - 1) < 5 * math.sqrt(2 / len(samples))
    assert stats.kstest(samples, "norm").pvalue > 1e-3
    # Pairs are independent: the cos and sin halves are uncorrelated.
    half = len(samples) // 2
    assert abs(np.corrcoef(samples[:half], samples[half : 2 * half])[0, 1]) < 0.02
    assert np.abs(samples).max() < math.sqrt(2 * 53 * math.log(2)) + 1e-9


def test_the_noise_in_a_dp_step_has_the_calibrated_law(initial_state) -> None:
    """One DP-SGD step with lr 1 and sigma 1e4 on 32 records: the update is
    -(clipped sum + N(0, (sigma C)^2)) / (q n), dominated by the noise; its entries are
    normal with standard deviation sigma C / 32 (KS test, variance within 2%)."""
    data = benchmark_train_records().subset(np.arange(32))
    sigma = 1e4
    noisy = update(data, initial_state, sigma=sigma, random_bytes=_key(4)).double().numpy()
    scale = sigma * 1.0 / 32
    standardised = -noisy / scale
    assert abs(standardised.std() - 1) < 0.02
    assert abs(standardised.mean()) < 5 / math.sqrt(len(standardised)) + 32 / sigma
    assert stats.kstest(standardised, "norm").pvalue > 1e-3


def test_poisson_membership_is_bernoulli_q_per_record() -> None:
    """Each record joins a step independently with probability q: per-record frequencies
    and batch sizes match Binomial laws."""
    stream = _key(5)
    records, rate, steps = 500, 0.2, 400
    joined = np.zeros(records)
    sizes = []
    for _ in range(steps):
        indices = bernoulli_indices(records, rate, stream)
        assert np.all(np.diff(indices) > 0)
        joined[indices] += 1
        sizes.append(len(indices))
    sizes = np.array(sizes)
    assert abs(sizes.mean() - records * rate) < 5 * math.sqrt(records * rate * (1 - rate) / steps)
    assert abs(sizes.var() / (records * rate * (1 - rate)) - 1) < 0.2
    # Every record's count over the steps is Binomial(steps, q): a chi-square-like check.
    z = (joined - steps * rate) / math.sqrt(steps * rate * (1 - rate))
    assert abs(z.mean()) < 5 / math.sqrt(records) and abs(z.var() - 1) < 0.2
    assert bernoulli_indices(records, 0.0, stream).size == 0
    assert bernoulli_indices(records, 1.0, stream).size == records
