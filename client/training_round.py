"""One round at a site: check the policy and budget, train, and return the update."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from client.privacy_ledger import PrivacyLedger, calibrate_noise_multiplier, epsilon_of
from client.privacy_policy import PolicyRefusal, SitePrivacyPolicy, effective_privacy
from client.training import (
    DPSGDSettings,
    TrainingRecipe,
    sample_rate,
    steps_per_epoch,
    train_locally,
)
from common.data.dataset import ImageTextDataset
from common.model import CrossAttentionMatcher
from common.site_refusal import RefusalCode, SiteRefusal
from common.train_request import TrainRequest

logger = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """The update (``None`` when refused) and the aggregate metrics of one round."""

    update: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: SiteRefusal | None = None


def plan_noise(
    ledger: PrivacyLedger,
    *,
    epsilon: float,
    delta: float,
    floor: float,
    rate: float,
    total_steps: int,
) -> float:
    """The ledger's sigma; calibrated for the rest of the run the first time it is needed."""
    if ledger.noise_multiplier is None:
        sigma = calibrate_noise_multiplier(
            epsilon=epsilon, delta=delta, sample_rate=rate, steps=total_steps
        )
        ledger.noise_multiplier = max(sigma, floor)
        ledger.delta = delta
    return ledger.noise_multiplier


def rounds_left(request: TrainRequest) -> int:
    """Rounds of the run from ``request``'s on, this one included: what a site calibrates
    its noise for when a run first asks it to train (round 1 of a new run, or the round a
    resumed run restarts at)."""
    return max(1, request.num_server_rounds - request.server_round + 1)


def run_training_round(
    *,
    global_state: dict[str, torch.Tensor],
    request: TrainRequest,
    data: ImageTextDataset,
    policy: SitePrivacyPolicy,
    ledger: PrivacyLedger,
    run_id: int = 0,
) -> RoundOutcome:
    """Train on ``data`` from ``global_state`` unless the site's policy says no.

    ``ledger`` is updated in place when the site trains (``run_id`` tells a new run from a
    round of the current one). A refusal says why in plain words.
    """
    ledger.start_run(run_id)
    n = len(data)
    try:
        privacy = effective_privacy(policy, request, num_records=n)
    except PolicyRefusal as refusal:
        return RoundOutcome(
            update=None, refusal=SiteRefusal(RefusalCode.PRIVACY_POLICY, str(refusal))
        )
    if request.server_round in ledger.rounds:
        return RoundOutcome(
            update=None,
            refusal=SiteRefusal(
                RefusalCode.ALREADY_TRAINED, f"round {request.server_round} already trained"
            ),
        )

    recipe = TrainingRecipe.from_settings(
        request, seed=request.seed * 100_003 + request.server_round
    )
    dp: DPSGDSettings | None = None
    if privacy.private:
        rate = sample_rate(n, request.batch_size)
        round_steps = request.local_epochs * steps_per_epoch(n, request.batch_size)
        delta = ledger.delta or privacy.delta
        spent = ledger.epsilon(delta)
        try:
            sigma = plan_noise(
                ledger,
                # a new run gets what is left of the site's lifetime budget, spread over
                # the rounds it can still be asked for (fewer when a run resumes midway)
                epsilon=privacy.epsilon - spent,
                delta=privacy.delta,
                floor=privacy.noise_multiplier_floor,
                rate=rate,
                total_steps=round_steps * rounds_left(request),
            )
        except ValueError:  # nothing (or too little) left to calibrate for
            return RoundOutcome(
                update=None,
                refusal=SiteRefusal(
                    RefusalCode.PRIVACY_BUDGET,
                    f"privacy budget: {spent:.3f} of epsilon {privacy.epsilon:g} already "
                    f"spent (delta {delta:g}, record-level, RDP accountant)",
                ),
            )
        projected = epsilon_of([*ledger.history, (sigma, rate, round_steps)], delta)
        if projected > privacy.epsilon * (1 + 1e-9):
            return RoundOutcome(
                update=None,
                refusal=SiteRefusal(
                    RefusalCode.PRIVACY_BUDGET,
                    f"privacy budget: round {request.server_round} would take epsilon to "
                    f"{projected:.3f} > {privacy.epsilon:g} (delta {delta:g}, record-level, "
                    f"RDP accountant); spent so far {spent:.3f}",
                ),
            )
        dp = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm)

    model = CrossAttentionMatcher(request.model_config())
    model.load_state_dict(global_state)
    result = train_locally(model, data, recipe=recipe, dp=dp, accountant_history=ledger.history)
    ledger.history = result.accountant_history
    ledger.rounds.append(request.server_round)
    trained = model.state_dict()
    update = {k: trained[k] - global_state[k] for k in global_state}
    metrics = {
        "num-examples": int(result.num_examples),
        "train-loss": result.mean_loss,
        "epsilon": ledger.epsilon(ledger.delta) if dp else math.inf,
        "noise-multiplier": dp.noise_multiplier if dp else 0.0,
        "steps": int(result.steps),
    }
    return RoundOutcome(update=update, metrics=metrics)
