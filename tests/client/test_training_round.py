"""One round at a site (``run_training_round``) on a tiny dataset and a tiny model: it trains
under DP within its budget, refuses past it (saying why, ledger untouched), never trains
without DP when its own policy has a finite budget, and replies only with what its noisy
record count and its policy make public."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord

from fedmm.client.privacy_ledger import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    count_charge,
    epsilon_of,
)
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.record_count import public_count
from fedmm.client.training import sample_rate, steps_per_epoch
from fedmm.client.training_round import run_training_round
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.site_refusal import RefusalCode
from fedmm.common.train_request import TrainRequest

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

NUM_RECORDS, BATCH, ROUNDS = 64, 16, 3
STEPS_PER_ROUND = NUM_RECORDS // BATCH
METRIC_KEYS = {"num_examples", "steps", "epsilon_bound"}
COUNT_NOISE = SitePrivacyPolicy().record_count_noise


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


def train(
    round_: int,
    data,
    global_state,
    *,
    ledger,
    policy=None,
    run_id=0,
    persistent_ledger=True,
    **overrides,
):
    return run_training_round(
        global_state=global_state,
        request=TrainRequest.for_round(config(**overrides), round_),
        data=data,
        policy=policy or SitePrivacyPolicy(),
        ledger=ledger,
        run_id=run_id,
        persistent_ledger=persistent_ledger,
    )


def with_count(noisy_count: float, **fields) -> PrivacyLedger:
    """A ledger whose run already drew (and charged) ``noisy_count``."""
    history = [count_charge(COUNT_NOISE), *fields.pop("history", [])]
    return PrivacyLedger(
        history=history, noisy_count=noisy_count, count_releases=1, delta=1e-5, **fields
    )


def count_only(ledger: PrivacyLedger) -> PrivacyLedger:
    """What the ledger held before the run's first DP-SGD step: its noisy count only."""
    return PrivacyLedger(history=[count_charge(COUNT_NOISE)], count_releases=1)


def public_sampling(ledger: PrivacyLedger) -> tuple[int, float, int]:
    """(public count, q, steps per round) as the site derives them from its noisy count."""
    count = public_count(ledger.noisy_count)
    return count, sample_rate(count, BATCH), steps_per_epoch(count, BATCH)


def test_trains_every_planned_round_within_budget_then_refuses(data, global_state) -> None:
    ledger = PrivacyLedger()
    bounds, epsilons = [], []
    for round_ in range(1, ROUNDS + 1):
        outcome = train(round_, data, global_state, ledger=ledger)
        assert outcome.refusal is None and outcome.update is not None
        assert outcome.update.keys() == global_state.keys()
        for key, value in outcome.update.items():
            assert value.shape == global_state[key].shape and value.dtype == global_state[key].dtype
        assert any(bool(v.abs().max() > 0) for v in outcome.update.values())
        count, rate, steps = public_sampling(ledger)
        assert outcome.metrics["num_examples"] == count
        assert outcome.metrics["steps"] == steps
        bounds.append(outcome.metrics["epsilon_bound"])
        assert 0 < outcome.epsilon <= 3.0
        epsilons.append(outcome.epsilon)
    assert bounds == [3.0] * ROUNDS  # the committed bound, not the spend
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert ledger.rounds == [1, 2, 3]
    # The noisy count is drawn once for the run and charged once.
    assert ledger.count_releases == 1 and ledger.history[0] == count_charge(COUNT_NOISE)
    count, rate, steps = public_sampling(ledger)
    assert ledger.history[1:] == [(ledger.noise_multiplier, rate, ROUNDS * steps)]
    # Noise calibrated once for the whole run (after the count): nearly the whole budget.
    assert ledger.noise_multiplier == pytest.approx(
        calibrate_noise_multiplier(
            epsilon=3.0,
            delta=1e-5,
            sample_rate=rate,
            steps=ROUNDS * steps,
            spent=count_only(ledger),
        )
    )
    assert epsilons[-1] == pytest.approx(epsilon_of(ledger.history, 1e-5))
    assert epsilons[-1] > 0.99 * 3.0

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
    ledger = with_count(64.0, noise_multiplier=0.9, history=[(0.9, 0.25, 40)], rounds=[1])
    spent = ledger.epsilon()
    assert spent > 3.0
    _count, rate, steps = public_sampling(ledger)
    projected = epsilon_of([*ledger.history, (0.9, rate, steps)], 1e-5)
    before = copy.deepcopy(ledger)

    outcome = train(2, data, global_state, ledger=ledger)

    assert outcome.update is None and outcome.metrics == {}
    assert outcome.refusal is not None and outcome.refusal.code == RefusalCode.PRIVACY_BUDGET
    reason = outcome.refusal.detail
    assert reason.startswith("run privacy budget: round 2")
    assert f"{projected:.3f}" in reason and "> the 3 the run may spend" in reason
    assert "delta 1e-05" in reason and "larger epsilon or fewer rounds" in reason
    assert ledger == before


def test_a_spent_budget_refuses_before_drawing_the_count(data, global_state) -> None:
    """The count's own charge is checked first, on the ledger alone: a site with nothing
    left draws no count (the refusal cannot depend on it) and its ledger is untouched."""
    ledger = PrivacyLedger(delta=1e-5, history=[(0.9, 0.25, 40)])
    before = copy.deepcopy(ledger)
    outcome = train(1, data, global_state, ledger=ledger, run_id=5)
    assert outcome.refusal is not None and outcome.refusal.code == RefusalCode.LIFETIME_BUDGET
    assert "noisy record count" in outcome.refusal.detail
    assert ledger.noisy_count is None and ledger.history == before.history


def test_refuses_a_delta_not_below_one_over_the_noisy_count(data, global_state) -> None:
    """The check uses the noisy count, so it comes after the count is drawn and charged:
    the refusal (a code the coordinator sees) is post-processing of the noisy count."""
    ledger = PrivacyLedger()
    policy = SitePrivacyPolicy(delta=0.05, record_count_noise=1.0)  # count 64 +- a few
    outcome = train(1, data, global_state, ledger=ledger, policy=policy, delta=0.1)
    assert outcome.update is None and outcome.refusal is not None
    assert outcome.refusal.code == RefusalCode.PRIVACY_POLICY and "delta" in outcome.refusal.detail
    assert ledger.count_releases == 1 and ledger.history == [count_charge(1.0)]
    assert ledger.rounds == [] and ledger.noise_multiplier is None


def test_coordinator_asking_for_no_dp_still_gets_dp_at_the_sites_budget(data, global_state) -> None:
    """Site policy: max-epsilon 2. Coordinator: epsilon inf. The site trains with DP at its
    own budget (it does not refuse); the update it returns is noised."""
    policy = SitePrivacyPolicy(max_epsilon=2.0)
    updates = []
    for _ in range(2):
        ledger = PrivacyLedger()
        outcome = train(1, data, global_state, ledger=ledger, policy=policy, epsilon=math.inf)
        assert outcome.refusal is None and outcome.update is not None
        assert outcome.metrics["epsilon_bound"] == 2.0
        assert 0 < outcome.epsilon <= 2.0
        _count, rate, steps = public_sampling(ledger)
        assert ledger.noise_multiplier == pytest.approx(
            calibrate_noise_multiplier(
                epsilon=2.0,
                delta=1e-5,
                sample_rate=rate,
                steps=ROUNDS * steps,
                spent=count_only(ledger),
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
    assert ledger.noise_multiplier == 8.0
    assert outcome.epsilon < 1.0


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
    assert outcome.metrics["epsilon_bound"] == math.inf and outcome.epsilon == math.inf
    assert outcome.metrics["num_examples"] == NUM_RECORDS  # DP off: nothing is claimed
    assert ledger.history == [] and ledger.noise_multiplier is None
    assert ledger.noisy_count is None


def test_reply_metrics_are_public_by_construction(data, global_state) -> None:
    """A site sends its public (noisy) count, its steps and its epsilon bound: no train loss
    (its private batches' loss is covered by no accountant) and no exact epsilon (a function
    of its record count)."""
    ledger = PrivacyLedger()
    outcome = train(1, data, global_state, ledger=ledger)
    assert set(outcome.metrics) == METRIC_KEYS
    for key, value in outcome.metrics.items():
        assert type(value) in (int, float), (key, type(value))
    assert type(outcome.metrics["num_examples"]) is int
    assert type(outcome.metrics["steps"]) is int
    assert outcome.metrics["num_examples"] == public_count(ledger.noisy_count)
    assert outcome.metrics["epsilon_bound"] == 3.0 != outcome.epsilon
    MetricRecord(outcome.metrics)  # what the ClientApp sends
    # The update is one tensor per parameter, nothing shaped by the records.
    assert (
        all(v.shape == global_state[k].shape for k, v in outcome.update.items())
        and outcome.update.keys() == global_state.keys()
    )


def test_sampling_and_steps_follow_the_noisy_count_not_the_true_one(data, global_state) -> None:
    """64 records, but the run's noisy count says 160: q = 1/10 and 10 steps a round (the
    true count would give q = 1/4 and 4 steps), and the accountant records that q."""
    ledger = with_count(160.2, run_id=9)
    outcome = train(1, data, global_state, ledger=ledger, run_id=9)
    assert outcome.update is not None
    assert outcome.metrics["num_examples"] == 160
    assert outcome.metrics["steps"] == 10
    assert ledger.history[-1] == (ledger.noise_multiplier, 0.1, 10)


def test_a_new_run_spends_what_is_left_of_the_lifetime_budget(data, global_state) -> None:
    """A persisted ledger outlives a run: the next run's rounds are not "already trained",
    it draws (and is charged for) a new noisy count, its noise is calibrated for the budget
    left, and the lifetime epsilon stays capped."""
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
    assert ledger.count_releases == 2
    assert ledger.noise_multiplier != sigma_first  # calibrated afresh for what is left
    assert spent_first < ledger.epsilon() <= 3.0


def test_a_resumed_run_calibrates_for_the_rounds_it_has_left(data, global_state) -> None:
    """A run resumed at round 3 of 4 asks for 2 more rounds: a site with a persistent ledger
    spreads what is left of its budget over those 2, not over all 4."""
    ledger = PrivacyLedger()
    policy = SitePrivacyPolicy(max_epsilon=3.0)
    for round_ in (3, 4):
        outcome = train(
            round_, data, global_state, ledger=ledger, policy=policy, run_id=21, num_server_rounds=4
        )
        assert outcome.update is not None
    _count, rate, steps = public_sampling(ledger)
    for_two, for_four = (
        calibrate_noise_multiplier(
            epsilon=3.0,
            delta=1e-5,
            sample_rate=rate,
            steps=rounds * steps,
            spent=count_only(ledger),
        )
        for rounds in (2, 4)
    )
    assert ledger.noise_multiplier == pytest.approx(for_two)
    assert for_two < for_four
    assert ledger.rounds == [3, 4]
    assert ledger.epsilon() == pytest.approx(3.0, rel=0.02)  # the budget used, not a third
    assert ledger.epsilon() <= 3.0 * (1 + 1e-9)


def test_without_a_persistent_ledger_a_run_is_joined_at_round_one_only(data, global_state) -> None:
    """A ledger kept only in the run's node state is empty in a run resumed through
    ``flwr run`` (a new run id): the site cannot know what the earlier rounds spent, so it
    refuses every round after the first of a run it holds no state for, naming the fix."""
    ledger = PrivacyLedger()
    resumed = train(3, data, global_state, ledger=ledger, run_id=31, persistent_ledger=False)
    assert resumed.update is None and resumed.refusal is not None
    assert resumed.refusal.code == RefusalCode.LEDGER_UNKNOWN
    assert "ledger-file" in resumed.refusal.detail
    assert ledger == PrivacyLedger()  # nothing drawn, nothing spent
    # Round 1, then round 2 of the same run, are fine: the state of this run is there.
    for round_ in (1, 2):
        outcome = train(
            round_, data, global_state, ledger=ledger, run_id=31, persistent_ledger=False
        )
        assert outcome.update is not None
    # A persistent ledger (a file outliving the run) may join a run midway.
    joined = train(3, data, global_state, ledger=PrivacyLedger(), run_id=32)
    assert joined.update is not None


def test_budget_is_checked_at_the_smaller_of_the_ledger_and_policy_delta(
    data, global_state
) -> None:
    """An earlier run stated the ledger at delta 1e-5; this policy allows only 1e-8: the
    budget check and the calibration use 1e-8 (a larger epsilon for the same history)."""
    ledger = with_count(
        64.0, history=[(3.0, 0.25, 20)], noise_multiplier=3.0, run_id=40, rounds=[1]
    )
    # At 1e-5 the next round (4 more steps) would fit a budget of 2.3; at 1e-8 nothing does.
    assert ledger.epsilon_with([(3.0, 0.25, 4)], 1e-5) < 2.3 < ledger.epsilon(1e-8)
    policy = SitePrivacyPolicy(max_epsilon=2.3, delta=1e-8)
    outcome = train(2, data, global_state, ledger=ledger, policy=policy, run_id=40)
    assert outcome.refusal is not None and outcome.refusal.code == RefusalCode.PRIVACY_BUDGET
    assert "delta 1e-08" in outcome.refusal.detail


def test_the_run_asks_for_what_it_may_spend_and_the_policy_caps_the_lifetime(
    data, global_state
) -> None:
    """Two runs at the run epsilon 1.5 on a site whose policy caps its lifetime at 4: each run
    spends at most 1.5 of its own, the second is not refused for what the first spent, and
    together they stay within 4. A third run no longer fits the lifetime cap: the refusal
    names that limit (the site's own), not the run's."""
    ledger = PrivacyLedger()
    policy = SitePrivacyPolicy(max_epsilon=4.0)
    for run_id in (31, 32):
        for round_ in (1, 2):
            outcome = train(
                round_,
                data,
                global_state,
                ledger=ledger,
                policy=policy,
                run_id=run_id,
                epsilon=1.5,
                num_server_rounds=2,
            )
            assert outcome.update is not None, outcome.refusal
            assert outcome.metrics["epsilon_bound"] == 1.5
        assert ledger.this_run().epsilon(1e-5) <= 1.5 * (1 + 1e-9)
    assert 1.5 < ledger.epsilon(1e-5) <= 4.0
    # The run's entries start at its own noisy count: the first run's are not in it.
    assert ledger.history[ledger.run_start] == count_charge(COUNT_NOISE)
    assert ledger.this_run().epsilon(1e-5) < ledger.epsilon(1e-5)

    # The site's operator lowers its cap to just above what it has spent: the next run's
    # own budget is untouched, but the site's lifetime has no room left.
    spent = ledger.epsilon(1e-5)
    tight = SitePrivacyPolicy(max_epsilon=round(spent * 1.001, 4))
    third = train(1, data, global_state, ledger=ledger, policy=tight, run_id=33, epsilon=1.5)
    assert third.update is None and third.refusal is not None
    assert third.refusal.code == RefusalCode.LIFETIME_BUDGET
    assert "max-epsilon" in third.refusal.detail and "site's own policy" in third.refusal.detail


def test_the_run_markers_survive_both_stores(tmp_path) -> None:
    ledger = PrivacyLedger(history=[(1.0, 0.1, 5), (20.0, 1.0, 1)], delta=1e-5, run_id=7)
    ledger.run_start, ledger.run_distributed_start = 1, 0
    ledger.save(tmp_path / "ledger.json")
    for loaded in (
        PrivacyLedger.load(tmp_path / "ledger.json"),
        PrivacyLedger.from_record(ledger.to_record()),
    ):
        assert (loaded.run_start, loaded.run_distributed_start) == (1, 0)
        assert loaded.this_run().history == [(20.0, 1.0, 1)]
