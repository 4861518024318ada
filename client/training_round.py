"""One round at a site: check the policy and budget, train, and return the update.

What a site sends (``RoundOutcome.metrics``) is public by construction: its public record
count max(1, round(n~)) (``client.record_count``: the noisy count, charged to its ledger once
per run), the number of DP-SGD steps (a function of that count and the request), and the
epsilon bound it committed to (the smaller of its policy's ``max-epsilon`` and the run's
``epsilon``; a site that trains is within it). Its exact spend (``RoundOutcome.epsilon``) is
a function of its record count and stays in its ledger and log, as does the train loss of
its private batches, which no accountant covers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fedmm.client.privacy_budget import budget_refusal
from fedmm.client.privacy_ledger import PrivacyLedger, calibrate_noise_multiplier
from fedmm.client.privacy_policy import (
    EffectivePrivacy,
    PolicyRefusal,
    SitePrivacyPolicy,
    effective_privacy,
    require_delta_below_one_over,
)
from fedmm.client.record_count import draw_noisy_count, public_count
from fedmm.client.training import (
    DPSGDSettings,
    TrainingRecipe,
    check_distractors,
    sample_rate,
    steps_per_epoch,
    train_locally,
)
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.secure_random import RandomBytes, fresh_random_bytes
from fedmm.common.secure_round import METRIC_EPSILON_BOUND, METRIC_NUM_EXAMPLES, METRIC_STEPS
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import TrainRequest

if TYPE_CHECKING:
    from fedmm.client.feature_cache import SiteFeatures
    from fedmm.common.pretrained.frozen_encoders import FrozenEncoders

logger = logging.getLogger(__name__)

ACCOUNTANT = "RDP accountant"


@dataclass
class RoundOutcome:
    """The update (``None`` when refused), what the site sends with it, and its exact spend
    (``epsilon``: for its own log, never sent)."""

    update: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: SiteRefusal | None = None
    epsilon: float = math.nan


def _refused(code: RefusalCode, detail: str) -> RoundOutcome:
    return RoundOutcome(update=None, refusal=SiteRefusal(code, detail))


def plan_noise(
    ledger: PrivacyLedger,
    *,
    privacy: EffectivePrivacy,
    delta: float,
    rate: float,
    total_steps: int,
) -> float | SiteRefusal:
    """The run's sigma; calibrated the first time a run needs it, so that the run's entries
    (its noisy count and the ``total_steps`` it can still ask for) stay within the run's
    epsilon and the whole ledger (every earlier run too) within the site's lifetime
    max-epsilon: the larger of the two sigmas, never below the floor. A refusal names the
    budget that no noise can meet."""
    if ledger.noise_multiplier is not None:
        return ledger.noise_multiplier
    sigmas = []
    for epsilon, spent, code, budget in (
        (privacy.epsilon, ledger.this_run(), RefusalCode.PRIVACY_BUDGET, "the run's epsilon"),
        (
            privacy.lifetime_epsilon,
            ledger,
            RefusalCode.LIFETIME_BUDGET,
            "the site's lifetime max-epsilon (its own policy)",
        ),
    ):
        try:
            sigmas.append(
                calibrate_noise_multiplier(
                    epsilon=epsilon, delta=delta, sample_rate=rate, steps=total_steps, spent=spent
                )
            )
        except ValueError:  # nothing (or too little) left to calibrate for
            return SiteRefusal(
                code,
                f"privacy budget: {spent.epsilon(delta):.3f} of {budget} {epsilon:g} already "
                f"spent; no noise fits {total_steps} more steps (delta {delta:g}, "
                f"record-level, {ACCOUNTANT})",
            )
    ledger.noise_multiplier = max(*sigmas, privacy.noise_multiplier_floor)
    return ledger.noise_multiplier


def rounds_left(request: TrainRequest) -> int:
    """Rounds of the run from ``request``'s on, this one included: what a site calibrates
    its noise for when a run first asks it to train (round 1 of a new run, or the round a
    resumed run restarts at)."""
    return max(1, request.num_server_rounds - request.server_round + 1)


def unknown_run_refusal(
    ledger: PrivacyLedger, *, run_id: int, server_round: int, persistent_ledger: bool
) -> SiteRefusal | None:
    """A site whose ledger lives only in this run's node state cannot tell a run resumed
    midway (whose earlier rounds it may have trained under another run id, now forgotten)
    from a fresh one: it refuses any round after the first of a run it has no state for."""
    if persistent_ledger or server_round <= 1 or ledger.knows_run(run_id):
        return None
    return SiteRefusal(
        RefusalCode.LEDGER_UNKNOWN,
        f"round {server_round} of a run this site holds no ledger state for: it cannot know "
        "what earlier rounds spent (a resumed run?); name a persistent ledger in node "
        "config 'ledger-file' to take part in resumed runs",
    )


def release_noisy_count(
    ledger: PrivacyLedger,
    *,
    num_records: int,
    count_noise: float,
    privacy: EffectivePrivacy,
    delta: float,
    random_bytes: RandomBytes,
    accountant: str = ACCOUNTANT,
) -> SiteRefusal | None:
    """Draw and charge this run's noisy count, unless the run already has one; a refusal
    when the charge alone would exceed the run's or the site's lifetime budget (decided on
    the ledger only)."""
    if ledger.noisy_count is not None:
        return None
    projected = ledger.projected()
    projected.charge_noisy_count(0.0, count_noise=count_noise)
    refusal = budget_refusal(
        projected,
        run_epsilon=privacy.epsilon,
        lifetime_epsilon=privacy.lifetime_epsilon,
        delta=delta,
        what="releasing the noisy record count",
        accountant=accountant,
    )
    if refusal is not None:
        return refusal
    noisy = draw_noisy_count(num_records, count_noise=count_noise, random_bytes=random_bytes)
    ledger.charge_noisy_count(noisy, count_noise=count_noise)
    ledger.delta = delta
    return None


def run_training_round(
    *,
    global_state: dict[str, torch.Tensor],
    request: TrainRequest,
    data: ImageTextDataset,
    policy: SitePrivacyPolicy,
    ledger: PrivacyLedger,
    run_id: int = 0,
    persistent_ledger: bool = True,
    random_bytes: RandomBytes | None = None,
    features: SiteFeatures | None = None,
    model_config: ModelConfig | None = None,
    encoders: FrozenEncoders | None = None,
) -> RoundOutcome:
    """Train on ``data`` from ``global_state`` unless the site's policy says no.

    With frozen pretrained encoders, ``features`` are ``data``'s cached features and
    ``model_config`` the config resolved against the site's ``encoders``: the fusion head
    (and the LoRA adapters on the encoders' last blocks, when the run has them) is trained
    on the features (``client.feature_training``), and ``data`` serves the record count and
    the distractor checks.

    ``ledger`` is updated in place: when the site trains, and when it draws the run's noisy
    record count (charged even if the site then refuses, since the refusal may depend on
    it); the caller saves it whenever it changed. ``run_id`` tells a new run from a round of
    the current one; ``persistent_ledger`` says whether the ledger outlives the run (a
    file). Every random draw comes from ``random_bytes`` (default: a fresh CSPRNG). A
    refusal's detail is for the site's log; only its code is sent.
    """
    refusal = unknown_run_refusal(
        ledger,
        run_id=run_id,
        server_round=request.server_round,
        persistent_ledger=persistent_ledger,
    )
    if refusal is not None:
        return RoundOutcome(update=None, refusal=refusal)
    ledger.start_run(run_id)
    if request.server_round in ledger.rounds:
        return _refused(
            RefusalCode.ALREADY_TRAINED, f"round {request.server_round} already trained"
        )
    if len(data) == 0:
        return _refused(RefusalCode.NO_DATA, "no records")
    try:  # the caption bank's digest and every caption's distractors, before any spend
        recipe = TrainingRecipe.from_settings(
            request, seed=request.seed * 100_003 + request.server_round
        )
        check_distractors(
            data,
            recipe.distractors,
            tokenizer=HashingTokenizer.for_model(request.model_config()),
            num_distractors=recipe.num_distractors,
        )
    except ValueError as error:  # CaptionBankError, DistractorError
        return _refused(RefusalCode.BAD_REQUEST, f"distractors: {error}")
    privacy = effective_privacy(policy, request)
    stream = random_bytes or fresh_random_bytes()
    dp: DPSGDSettings | None = None
    count = len(data)  # DP off (site and run both allow it): nothing is claimed
    if privacy.private:
        planned = _plan_private_round(
            ledger, request=request, privacy=privacy, policy=policy, n=len(data), stream=stream
        )
        if isinstance(planned, SiteRefusal):
            return RoundOutcome(update=None, refusal=planned)
        dp = planned
        count = int(dp.record_count or 1)

    if features is not None:
        from fedmm.client.feature_training import train_on_features
        from fedmm.common.pretrained.lora_adapters import build_fusion_model

        head = build_fusion_model(model_config or request.model_config(), encoders)
        head.load_state_dict(global_state)
        result = train_on_features(
            head,
            features,
            recipe=recipe,
            dp=dp,
            accountant_history=ledger.history,
            random_bytes=stream,
        )
        model: torch.nn.Module = head
    else:
        model = CrossAttentionMatcher(request.model_config())
        model.load_state_dict(global_state)
        result = train_locally(
            model,
            data,
            recipe=recipe,
            dp=dp,
            accountant_history=ledger.history,
            random_bytes=stream,
        )
    ledger.history = result.accountant_history
    ledger.rounds.append(request.server_round)
    trained = model.state_dict()
    update = {k: trained[k] - global_state[k] for k in global_state}
    epsilon = ledger.epsilon(ledger.delta) if dp else math.inf
    logger.info(
        "round %d trained: %d steps, epsilon %.4f spent (delta %g), train loss %.4f "
        "(site log only)",
        request.server_round,
        result.steps,
        epsilon,
        ledger.delta or privacy.delta,
        result.mean_loss,
    )
    metrics = {
        METRIC_NUM_EXAMPLES: int(count),
        METRIC_STEPS: int(result.steps),
        METRIC_EPSILON_BOUND: privacy.epsilon,
    }
    return RoundOutcome(update=update, metrics=metrics, epsilon=epsilon)


def _plan_private_round(
    ledger: PrivacyLedger,
    *,
    request: TrainRequest,
    privacy: EffectivePrivacy,
    policy: SitePrivacyPolicy,
    n: int,
    stream: RandomBytes,
) -> DPSGDSettings | SiteRefusal:
    """The noisy count (drawn and charged once per run), then sigma and the budget check,
    all derived from the noisy count; or a refusal."""
    delta = ledger.budget_delta(privacy.delta)
    refusal = release_noisy_count(
        ledger,
        num_records=n,
        count_noise=policy.record_count_noise,
        privacy=privacy,
        delta=delta,
        random_bytes=stream,
    )
    if refusal is not None:
        return refusal
    count = public_count(ledger.noisy_count or 0.0)
    try:
        require_delta_below_one_over(count, delta)
    except PolicyRefusal as error:
        return SiteRefusal(RefusalCode.PRIVACY_POLICY, str(error))
    rate = sample_rate(count, request.batch_size)
    round_steps = request.local_epochs * steps_per_epoch(count, request.batch_size)
    sigma = plan_noise(
        ledger,
        # a new run gets what it may spend (and what is left of the site's lifetime budget),
        # spread over the rounds it can still be asked for (fewer when a run resumes midway)
        privacy=privacy,
        delta=delta,
        rate=rate,
        total_steps=round_steps * rounds_left(request),
    )
    if isinstance(sigma, SiteRefusal):
        return sigma
    projected = ledger.projected()
    projected.history.append((sigma, rate, round_steps))
    refusal = budget_refusal(
        projected,
        run_epsilon=privacy.epsilon,
        lifetime_epsilon=privacy.lifetime_epsilon,
        delta=delta,
        what=f"round {request.server_round}",
        accountant=ACCOUNTANT,
    )
    if refusal is not None:
        return refusal
    ledger.delta = delta
    return DPSGDSettings(
        noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm, record_count=count
    )
