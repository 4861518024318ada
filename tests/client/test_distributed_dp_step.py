"""A site's distributed-DP step: its own trust assumption and budget decide, and the vector it
hands to SecAgg+ is the integer gradient sum plus its noise share, in Z_(2^b)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmm.client.distributed_dp_step import run_distributed_dp_step
from fedmm.client.privacy_ledger import PrivacyLedger, count_charge
from fedmm.client.privacy_policy import PolicyError, SitePrivacyPolicy
from fedmm.client.record_count import public_count
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.distributed_dp.plan import plan_distributed_dp
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.site_refusal import RefusalCode
from fedmm.common.train_request import TrainRequest, model_config_of

CONFIG = FederationConfig.from_run_config(
    {"model-width": 8, "model-heads": 2, "num-server-rounds": 20, "dp-mode": "distributed"}
)


def _data(n: int = 40) -> ImageTextDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 28, 56), dtype=np.uint8)
    captions = ["a dark shirt on the left and a sandal on the right"] * n
    return ImageTextDataset(images=images, captions=captions, labels=np.zeros(n, dtype=np.int64))


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return CrossAttentionMatcher(model_config_of(CONFIG)).state_dict()


def _plan(state: dict[str, torch.Tensor], honest: int = 4):
    return plan_distributed_dp(
        epsilon=3.0,
        delta=1e-5,
        sample_rate=0.5,
        num_rounds=CONFIG.num_server_rounds,
        clip_norm=1.0,
        dimension=sum(
            p.numel() for p in CrossAttentionMatcher(model_config_of(CONFIG)).parameters()
        ),
        min_honest_sites=honest,
    )


def _step(
    policy: SitePrivacyPolicy,
    ledger: PrivacyLedger,
    server_round: int = 1,
    plan=None,
    *,
    run_id: int = 0,
    persistent_ledger: bool = True,
):
    state = _state()
    return run_distributed_dp_step(
        global_state=state,
        request=TrainRequest.for_round(CONFIG, server_round),
        plan=plan or _plan(state),
        data=_data(),
        policy=policy,
        ledger=ledger,
        bit_width=32,
        run_id=run_id,
        persistent_ledger=persistent_ledger,
    )


def test_step_returns_a_ring_vector_and_records_the_round() -> None:
    ledger = PrivacyLedger()
    outcome = _step(SitePrivacyPolicy(), ledger)
    assert outcome.refusal is None and outcome.integers is not None
    assert outcome.integers.dtype == np.uint64 and np.all(outcome.integers < 2**32)
    # The weight slot carries the noisy count, drawn and charged once for the run.
    assert outcome.honest_sites == 4
    assert outcome.num_records == public_count(ledger.noisy_count)
    assert ledger.count_releases == 1 and ledger.history == [count_charge(20.0)]
    assert sum(entry[4] for entry in ledger.distributed_history) == 1
    assert outcome.epsilon == pytest.approx(ledger.epsilon(1e-5))
    assert outcome.epsilon_bound == 3.0  # what the site sends: its bound, not its spend
    # The noise share dominates a 40-record step: entries are centred near 0, spread sqrt(var).
    centred = np.where(
        outcome.integers >= 2**31,
        outcome.integers.astype(np.int64) - 2**32,
        outcome.integers.astype(np.int64),
    )
    plan = _plan(_state())
    assert abs(centred.std() / math.sqrt(plan.share_variance) - 1) < 0.1


def test_site_accounts_with_its_own_trust_assumption_and_refuses_over_budget() -> None:
    # The run sized shares for 4 honest sites; a site assuming only 2 sees twice the epsilon
    # rate, so the planned run exceeds its budget of 3 at the first round.
    outcome = _step(SitePrivacyPolicy(min_honest_sites=2), PrivacyLedger())
    assert outcome.integers is None
    assert outcome.refusal is not None and outcome.refusal.code == RefusalCode.PRIVACY_BUDGET
    assert "assuming 2 honest surviving sites" in outcome.refusal.detail
    assert "record-level" in outcome.refusal.detail
    # A site that assumes more honest sites than the run does accounts for more noise.
    assert _step(SitePrivacyPolicy(min_honest_sites=8), PrivacyLedger()).refusal is None


def test_the_count_is_drawn_once_per_run_and_the_plan_budgets_for_it() -> None:
    ledger = PrivacyLedger()
    first = _step(SitePrivacyPolicy(), ledger, 1, run_id=4)
    noisy = ledger.noisy_count
    second = _step(SitePrivacyPolicy(), ledger, 2, run_id=4)
    assert first.refusal is None and second.refusal is None
    assert ledger.noisy_count == noisy and ledger.count_releases == 1
    assert first.num_records == second.num_records == public_count(noisy)
    # The whole planned run, count included, meets the run's epsilon with the plan's h.
    plan = _plan(_state())
    assert plan.run_epsilon(4) == pytest.approx(3.0, rel=1e-3)
    # A site that insists on more count noise than the plan is charged its own (less).
    cautious = PrivacyLedger()
    assert _step(SitePrivacyPolicy(record_count_noise=50.0), cautious).refusal is None
    assert cautious.history == [count_charge(50.0)]


def test_a_resumed_run_without_a_persistent_ledger_is_refused() -> None:
    ledger = PrivacyLedger()
    outcome = _step(SitePrivacyPolicy(), ledger, 5, run_id=8, persistent_ledger=False)
    assert outcome.integers is None and outcome.refusal is not None
    assert outcome.refusal.code == RefusalCode.LEDGER_UNKNOWN
    assert "ledger-file" in outcome.refusal.detail
    assert ledger == PrivacyLedger()
    assert _step(SitePrivacyPolicy(), ledger, 5, run_id=8).refusal is None  # with a file


def test_lifetime_budget_counts_earlier_rounds() -> None:
    ledger = PrivacyLedger(history=[(1.0, 0.5, 30)])  # an earlier site-local run
    outcome = _step(SitePrivacyPolicy(max_epsilon=3.0), ledger, run_id=1)
    assert outcome.integers is None and outcome.refusal is not None
    # This run has spent nothing: it is the site's lifetime cap that has no room left.
    assert outcome.refusal.code == RefusalCode.LIFETIME_BUDGET
    assert "max-epsilon 3" in outcome.refusal.detail


def test_policy_key() -> None:
    """The unmask guard on h: ``tests/client/secagg/test_secagg_aggregation_floor.py``."""
    assert SitePrivacyPolicy.from_mapping({"min-honest-sites": 5}, source="t").min_honest_sites == 5
    with pytest.raises(PolicyError):
        SitePrivacyPolicy.from_mapping({"min-honest-sites": 2.5}, source="t")


def test_integer_sum_is_the_clipped_gradient_sum_up_to_rounding() -> None:
    """With q = 1 and no noise, gamma * S equals the sum of per-record clipped gradients
    (computed one record at a time with plain autograd) within the rounding, gamma sqrt(d)."""
    from fedmm.client.distributed_dp_step import integer_gradient_sum
    from fedmm.client.training import MatchingDataset
    from fedmm.common.loss import matching_loss
    from fedmm.common.tokenizer import HashingTokenizer

    state = _state()
    plan = _plan(state)
    data = _data(6)
    model = CrossAttentionMatcher(model_config_of(CONFIG))
    model.load_state_dict(state)
    tokenizer = HashingTokenizer(
        max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
    )
    keys = list(state)
    # The same distractors on both sides: one distractor draw per record, fixed seed.
    dataset = MatchingDataset(data, tokenizer=tokenizer, num_distractors=4, seed=5)
    items = [dataset[i] for i in range(len(data))]
    clip = 0.05  # small enough that every record is clipped
    expected = torch.zeros(sum(v.numel() for v in state.values()), dtype=torch.float64)
    for image, tokens in items:
        model.zero_grad()
        matching_loss(model(image[None], tokens[None])).sum().backward()
        params = dict(model.named_parameters())
        flat = torch.cat(
            [
                params[k].grad.reshape(-1) if k in params else torch.zeros(state[k].numel())
                for k in keys
            ]
        ).double()
        expected += flat * min(1.0, clip / float(flat.norm()))

    import fedmm.client.distributed_dp_step as step

    original = step.MatchingDataset
    step.MatchingDataset = lambda data, **kw: items  # the same distractor draws
    try:
        summed = integer_gradient_sum(
            model,
            data,
            indices=np.arange(len(data)),
            keys=keys,
            plan=plan,
            clip_norm=clip,
            num_distractors=4,
            tokenizer=tokenizer,
        )
    finally:
        step.MatchingDataset = original
    got = torch.from_numpy(summed).double() * plan.scale
    assert float((got - expected).norm()) <= plan.scale * math.sqrt(len(expected))
    assert float((got - expected).norm()) < 0.05 * float(expected.norm())
