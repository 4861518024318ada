"""A site's record count leaves it only as a noisy count, charged to its ledger, and its
epsilon (count and DP-SGD steps together) matches Google's ``dp_accounting``.

With the count public, a site's guarantee is effectively replace-one (its FedAvg weight and
sampling rate reveal n); with n~ = n + N(0, sigma_c^2) accounted as a Gaussian mechanism of
sensitivity 1, add/remove stays the honest unit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from fedmm.client.privacy_ledger import PrivacyLedger, count_charge, epsilon_of
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.record_count import draw_noisy_count, public_count
from fedmm.client.training_round import run_training_round
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.secure_random import aes_ctr_random_bytes
from fedmm.common.train_request import TrainRequest

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def test_the_noisy_count_is_gaussian_around_the_true_count() -> None:
    stream = aes_ctr_random_bytes(bytes(range(32)))
    draws = np.array(
        [draw_noisy_count(5400, count_noise=20.0, random_bytes=stream) for _ in range(20_000)]
    )
    standardised = (draws - 5400) / 20.0
    assert abs(standardised.mean()) < 5 / math.sqrt(len(draws))
    assert abs(standardised.std() - 1) < 0.03
    assert stats.kstest(standardised, "norm").pvalue > 1e-3
    with pytest.raises(ValueError, match="count noise"):
        draw_noisy_count(10, count_noise=0.0, random_bytes=stream)


def test_the_public_count_is_a_positive_integer() -> None:
    assert public_count(5400.4) == 5400 and public_count(5400.6) == 5401
    assert public_count(0.2) == 1 and public_count(-35.0) == 1


def test_a_count_charge_is_the_gaussian_mechanism_of_sensitivity_one() -> None:
    """(sigma_c, q = 1, 1 step) in the RDP history: alpha / (2 sigma_c^2), the Gaussian
    mechanism's RDP, as dp_accounting's unsampled Gaussian event."""
    ours = epsilon_of([count_charge(2.0)], 1e-5)
    accountant = RdpAccountant()
    accountant.compose(GaussianDpEvent(2.0))
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)


def _dp_accounting_epsilon(history, delta: float) -> float:
    accountant = RdpAccountant()
    for sigma, q, steps in history:
        event = (
            GaussianDpEvent(sigma) if q == 1.0 else PoissonSampledDpEvent(q, GaussianDpEvent(sigma))
        )
        accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def test_a_sites_whole_epsilon_matches_dp_accounting() -> None:
    """Two rounds of a real site: the ledger's epsilon (noisy count + DP-SGD steps at the q
    its noisy count sets) equals dp_accounting's composition of the same events within 1%."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = FederationConfig(
            num_server_rounds=2,
            batch_size=16,
            learning_rate=0.1,
            num_distractors=2,
            model_width=16,
            model_heads=2,
        )
        torch.manual_seed(0)
        state = CrossAttentionMatcher(TrainRequest.for_round(config, 1).model_config()).state_dict()
        data = benchmark_train_records().subset(np.arange(96))
        ledger = PrivacyLedger()
        for round_ in (1, 2):
            outcome = run_training_round(
                global_state=state,
                request=TrainRequest.for_round(config, round_),
                data=data,
                policy=SitePrivacyPolicy(),
                ledger=ledger,
                run_id=3,
            )
            assert outcome.update is not None
    finally:
        torch.set_num_threads(threads)
    assert ledger.history[0] == count_charge(20.0) and ledger.count_releases == 1
    count = public_count(ledger.noisy_count)
    steps = 2 * math.ceil(count / 16)
    assert ledger.history[1] == (ledger.noise_multiplier, 1 / math.ceil(count / 16), steps)
    google = _dp_accounting_epsilon(ledger.history, 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(google, rel=0.01)
    assert ledger.epsilon(1e-5) <= 3.0 * (1 + 1e-9)
    # The count is a real charge: the DP-SGD steps alone spend less.
    assert epsilon_of(ledger.history[1:], 1e-5) < ledger.epsilon(1e-5)
