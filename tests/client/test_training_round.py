"""One round at a site (``run_training_round``) on a tiny dataset and a tiny model: it trains
under DP within its budget, refuses past it (saying why, ledger untouched), never trains
without DP when its own policy has a finite budget, and replies with aggregates only."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord

from client.privacy_ledger import PrivacyLedger, calibrate_noise_multiplier, epsilon_of
from client.privacy_policy import SitePrivacyPolicy
from client.training import sample_rate
from client.training_round import run_training_round
from common.data.benchmark import benchmark_train_records
from common.federation_config import FederationConfig
from common.model import CrossAttentionMatcher
from common.site_refusal import RefusalCode
from common.train_request import TrainRequest

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

NUM_RECORDS, BATCH, ROUNDS = 64, 16, 3
STEPS_PER_ROUND = NUM_RECORDS // BATCH
METRIC_KEYS = {"num-examples", "train-loss", "epsilon", "noise-multiplier", "steps"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster, and much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> FederationConfig:
    values = dict(
        num_server_rounds=ROUNDS,
        epsilon=3.0,
        delta=1e-5,
        batch_size=BATCH,
        learning_rate=0.1,
        num_distractors=2,
        model_width=16,
        model_heads=2,
    )
    return FederationConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def data():
    return benchmark_train_records().subset(np.arange(NUM_RECORDS))


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    request = TrainRequest.for_round(config(), 1)
    return {
        k: v.clone() for k, v in CrossAttentionMatcher(request.model_config()).state_dict().items()
    }


def train(round_: int, data, global_state, *, ledger, policy=None, run_id=0, **overrides):
    return run_training_round(
        global_state=global_state,
        request=TrainRequest.for_round(config(**overrides), round_),
        data=data,
        policy=policy or SitePrivacyPolicy(),
        ledger=ledger,
        run_id=run_id,
    )


def test_trains_every_planned_round_within_budget_then_refuses(data, global_state) -> None:
    ledger = PrivacyLedger()
    epsilons = []
    for round_ in range(1, ROUNDS + 1):
        outcome = train(round_, data, global_state, ledger=ledger)
        assert outcome.refusal is None and outcome.update is not None
        assert outcome.update.keys() == global_state.keys()
        for key, value in outcome.update.items():
            assert value.shape == global_state[key].shape and value.dtype == global_state[key].dtype
        assert any(bool(v.abs().max() > 0) for v in outcome.update.values())
        assert outcome.metrics["num-examples"] == NUM_RECORDS
        assert outcome.metrics["steps"] == STEPS_PER_ROUND
        assert math.isfinite(outcome.metrics["train-loss"])
        assert 0 < outcome.metrics["epsilon"] <= 3.0
        epsilons.append(outcome.metrics["epsilon"])
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert ledger.rounds == [1, 2, 3]
    assert sum(n for _, _, n in ledger.history) == ROUNDS * STEPS_PER_ROUND
    # Noise calibrated once for the whole run: the planned rounds spend nearly the budget.
    q = sample_rate(NUM_RECORDS, BATCH)
    assert ledger.noise_multiplier == pytest.approx(
        calibrate_noise_multiplier(
            epsilon=3.0, delta=1e-5, sample_rate=q, steps=ROUNDS * STEPS_PER_ROUND
        )
    )
    assert epsilons[-1] == pytest.approx(epsilon_of(ledger.history, 1e-5))
    assert epsilons[-1] > 0.95 * 3.0

    # A round beyond the plan would overspend: refused, ledger untouched.
    before = copy.deepcopy(ledger)
    refused = train(ROUNDS + 1, data, global_state, ledger=ledger)
    assert refused.update is None and refused.metrics == {}
    assert refused.refusal is not None and refused.refusal.code == RefusalCode.PRIVACY_BUDGET
    assert ledger == before
    # The same round twice is refused too.
    again = train(2, data, global_state, ledger=ledger)
    assert again.update is None and again.refusal is not None
    assert again.refusal.code == RefusalCode.ALREADY_TRAINED
    assert ledger == before


def test_refuses_when_the_ledger_has_spent_the_budget(data, global_state) -> None:
    q = sample_rate(NUM_RECORDS, BATCH)
    ledger = PrivacyLedger(noise_multiplier=0.9, delta=1e-5, history=[(0.9, q, 40)], rounds=[1])
    spent = ledger.epsilon()
    assert spent > 3.0
    projected = epsilon_of([*ledger.history, (0.9, q, STEPS_PER_ROUND)], 1e-5)
    before = copy.deepcopy(ledger)

    outcome = train(2, data, global_state, ledger=ledger)

    assert outcome.update is None and outcome.metrics == {}
    assert outcome.refusal is not None and outcome.refusal.code == RefusalCode.PRIVACY_BUDGET
    reason = outcome.refusal.detail
    assert reason.startswith("privacy budget")
    assert f"{projected:.3f}" in reason and f"{spent:.3f}" in reason
    assert "> 3 " in reason and "delta 1e-05" in reason
    assert ledger == before


def test_refuses_a_delta_not_below_one_over_n(data, global_state) -> None:
    ledger = PrivacyLedger()
    outcome = train(
        1, data, global_state, ledger=ledger, policy=SitePrivacyPolicy(delta=0.05), delta=0.1
    )
    assert outcome.update is None and outcome.refusal is not None
    assert outcome.refusal.code == RefusalCode.PRIVACY_POLICY and "delta" in outcome.refusal.detail
    assert ledger == PrivacyLedger()


def test_coordinator_asking_for_no_dp_still_gets_dp_at_the_sites_budget(data, global_state) -> None:
    """Site policy: max-epsilon 2. Coordinator: epsilon inf. The site trains with DP at its
    own budget (it does not refuse); the update it returns is noised."""
    policy = SitePrivacyPolicy(max_epsilon=2.0)
    updates = []
    for _ in range(2):
        ledger = PrivacyLedger()
        outcome = train(1, data, global_state, ledger=ledger, policy=policy, epsilon=math.inf)
        assert outcome.refusal is None and outcome.update is not None
        assert outcome.metrics["noise-multiplier"] > 0
        assert 0 < outcome.metrics["epsilon"] <= 2.0
        assert ledger.noise_multiplier == outcome.metrics["noise-multiplier"]
        assert ledger.noise_multiplier == pytest.approx(
            calibrate_noise_multiplier(
                epsilon=2.0,
                delta=1e-5,
                sample_rate=sample_rate(NUM_RECORDS, BATCH),
                steps=ROUNDS * STEPS_PER_ROUND,
            )
        )
        updates.append(torch.cat([v.flatten() for v in outcome.update.values()]))
    # Same inputs, same request seed, different updates: fresh secret noise each time.
    assert not torch.allclose(updates[0], updates[1])


def test_site_noise_floor_raises_the_noise(data, global_state) -> None:
    ledger = PrivacyLedger()
    outcome = train(
        1, data, global_state, ledger=ledger, policy=SitePrivacyPolicy(min_noise_multiplier=8.0)
    )
    assert outcome.metrics["noise-multiplier"] == 8.0
    assert outcome.metrics["epsilon"] < 1.0


def test_without_dp_only_when_site_and_run_both_allow_it(data, global_state) -> None:
    ledger = PrivacyLedger()
    outcome = train(
        1,
        data,
        global_state,
        ledger=ledger,
        policy=SitePrivacyPolicy(max_epsilon=math.inf),
        epsilon=math.inf,
    )
    assert outcome.update is not None
    assert outcome.metrics["epsilon"] == math.inf and outcome.metrics["noise-multiplier"] == 0.0
    assert ledger.history == [] and ledger.noise_multiplier is None


def test_reply_metrics_are_aggregates_only(data, global_state) -> None:
    outcome = train(1, data, global_state, ledger=PrivacyLedger())
    assert set(outcome.metrics) == METRIC_KEYS
    for key, value in outcome.metrics.items():
        assert type(value) in (int, float), (key, type(value))
    assert type(outcome.metrics["num-examples"]) is int
    assert type(outcome.metrics["steps"]) is int
    MetricRecord(outcome.metrics)  # what the ClientApp sends
    # The update is one tensor per parameter, nothing shaped by the records.
    assert (
        all(v.shape == global_state[k].shape for k, v in outcome.update.items())
        and outcome.update.keys() == global_state.keys()
    )


def test_a_new_run_spends_what_is_left_of_the_lifetime_budget(data, global_state) -> None:
    """A persisted ledger outlives a run: the next run's rounds are not "already trained",
    its noise is calibrated for the budget left, and the lifetime epsilon stays capped."""
    ledger = PrivacyLedger()
    policy = SitePrivacyPolicy(max_epsilon=3.0)
    first = train(1, data, global_state, ledger=ledger, policy=policy, run_id=11, epsilon=1.5)
    assert first.update is not None
    sigma_first, spent_first = ledger.noise_multiplier, ledger.epsilon()
    replay = train(1, data, global_state, ledger=ledger, policy=policy, run_id=11, epsilon=1.5)
    assert replay.update is None and replay.refusal is not None
    assert replay.refusal.code == RefusalCode.ALREADY_TRAINED
    second = train(1, data, global_state, ledger=ledger, policy=policy, run_id=12)
    assert second.update is not None
    assert ledger.run_id == 12 and ledger.rounds == [1]
    assert ledger.noise_multiplier != sigma_first  # calibrated afresh for what is left
    assert spent_first < ledger.epsilon() <= 3.0


def test_a_resumed_run_calibrates_for_the_rounds_it_has_left(data, global_state) -> None:
    """A run resumed at round 3 of 4 asks for 2 more rounds: the site spreads what is left of
    its budget over those 2, not over all 4 (which would add noise for nothing)."""
    ledger = PrivacyLedger()
    policy = SitePrivacyPolicy(max_epsilon=3.0)
    for round_ in (3, 4):
        outcome = train(
            round_, data, global_state, ledger=ledger, policy=policy, run_id=21, num_server_rounds=4
        )
        assert outcome.update is not None
    rate = sample_rate(NUM_RECORDS, BATCH)
    for_two, for_four = (
        calibrate_noise_multiplier(
            epsilon=3.0, delta=1e-5, sample_rate=rate, steps=rounds * STEPS_PER_ROUND
        )
        for rounds in (2, 4)
    )
    assert ledger.noise_multiplier == pytest.approx(for_two)
    assert for_two < for_four
    assert ledger.rounds == [3, 4]
    assert ledger.epsilon() == pytest.approx(3.0, rel=0.02)  # the budget used, not a third
    assert ledger.epsilon() <= 3.0 * (1 + 1e-9)
