"""A site's part of one distributed-DP round: one DP-SGD step on the union of the sites' data.

The coordinator sends the model and the run's ``DistributedDPPlan``. The site

1. checks the plan against its own policy and lifetime ledger (it accounts with its own
   trust assumption h: the Skellam variance of h shares; Agarwal, Kairouz, Liu, NeurIPS 2021),
   and refuses, saying why, when the run or this round would exceed its budget;
2. Poisson-samples its records at rate q with uniforms from ``os.urandom`` (Abadi et al., CCS
   2016: every record of the federation joins the step independently with probability q);
3. computes per-example gradients (``client.per_example_gradients``: Opacus' per-layer grad
   samplers from one backward pass, in float64 from the norms on), clips each to C, divides it
   by the scale gamma = C / c, sums them and rounds the sum to integers at random (Kairouz,
   Liu, Steinke, ICML 2021), so that one record moves the integer sum by at most D2 = c +
   sqrt(d) in L2 and D1 in L1 (``common.distributed_dp.rounding``: the sensitivities the
   accountant uses), then clips each entry to the plan's public bound [-L, L] (1-Lipschitz
   per entry: the sensitivities still hold; no sum can wrap mod 2^b);
4. adds its Skellam share (variance ``share_variance``, sampled from ``os.urandom`` by exact
   inversion) and reduces the result into Z_(2^b) for SecAgg+.

Its record count goes into the SecAgg+ weight slot only as its noisy count (drawn and charged
once per run, ``client.record_count``), so the coordinator learns N = sum of noisy counts.

The guarantee: record-level (epsilon, delta)-DP with respect to adding or removing one record
anywhere in the federation, for the sequence of revealed noisy sums and noisy counts (and so
the model, by post-processing), provided at least h sites whose shares are in each sum are
honest (follow the protocol and keep their noise secret from the coordinator) and SecAgg+
reveals only the sum. The sampled batch size and the training loss are not sent.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from fedmm.client.privacy_budget import budget_refusal
from fedmm.client.privacy_ledger import PrivacyLedger
from fedmm.client.privacy_policy import (
    EffectivePrivacy,
    PolicyRefusal,
    SitePrivacyPolicy,
    effective_privacy,
    require_delta_below_one_over,
)
from fedmm.client.record_count import public_count
from fedmm.client.training import MatchingDataset, check_distractors
from fedmm.client.training_round import release_noisy_count, unknown_run_refusal
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.distractors import DistractorSettings
from fedmm.common.distributed_dp.plan import DistributedDPPlan
from fedmm.common.distributed_dp.rounding import new_rounding_generator, randomized_round
from fedmm.common.distributed_dp.skellam import RandomBytes, skellam_share
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.secure_random import bernoulli_indices
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import TrainRequest

ACCOUNTANT = (
    "RDP of the Poisson-subsampled Skellam mechanism "
    "(Agarwal et al. 2021; binomial subsampling bound, both directions)"
)
MICRO_BATCH = 128


@dataclass
class DistributedStepOutcome:
    """The masked-to-be vector (``None`` when refused) and what the site reports."""

    integers: np.ndarray | None  # uint64 entries in [0, 2^b), the global arrays' order
    num_records: int = 0  # the public (noisy) record count: the weight slot
    epsilon: float = math.nan  # the exact spend after this round: the site's log only
    epsilon_bound: float = math.nan  # the bound the site commits to (sent)
    honest_sites: int = 0
    refusal: SiteRefusal | None = None


def honest_sites_assumed(policy: SitePrivacyPolicy, plan: DistributedDPPlan) -> int:
    """The site's own trust assumption h (its policy), else the run's."""
    return policy.min_honest_sites or plan.min_honest_sites


def check_budget(
    *,
    plan: DistributedDPPlan,
    ledger: PrivacyLedger,
    privacy: EffectivePrivacy,
    delta: float,
    honest_sites: int,
    first_round_of_run: bool,
    count_noise: float | None = None,
) -> tuple[SiteRefusal | None, float]:
    """A refusal (None: go ahead) when the run (first round) or this round would exceed the
    run's epsilon or the site's lifetime budget (``client.privacy_budget``), and the lifetime
    epsilon after this round. ``count_noise``: a noisy record count still to be charged this
    run (None when the ledger holds it already)."""
    accountant = f"{ACCOUNTANT}, assuming {honest_sites} honest surviving sites"
    if count_noise is not None:
        ledger = _with_count(ledger, count_noise)
    checks = [(1, "this round")]
    if first_round_of_run:
        checks.insert(0, (plan.num_rounds, f"the run's {plan.num_rounds} distributed-DP rounds"))
    for rounds, what in checks:
        projected = _with_rounds(ledger, plan, honest_sites, rounds)
        refusal = budget_refusal(
            projected,
            run_epsilon=privacy.epsilon,
            lifetime_epsilon=privacy.lifetime_epsilon,
            delta=delta,
            what=what,
            accountant=accountant,
        )
        if refusal is not None:
            return refusal, projected.epsilon(delta)
    return None, projected.epsilon(delta)


def _with_count(ledger: PrivacyLedger, count_noise: float) -> PrivacyLedger:
    copy = ledger.projected()
    copy.charge_noisy_count(0.0, count_noise=count_noise)
    return copy


def _with_rounds(
    ledger: PrivacyLedger, plan: DistributedDPPlan, honest_sites: int, rounds: int
) -> PrivacyLedger:
    copy = ledger.projected()
    entry = plan.round_entry(honest_sites, rounds)
    copy.add_distributed_round(
        (
            entry.variance,
            entry.l1_sensitivity,
            entry.l2_sensitivity,
            entry.sample_rate,
            entry.steps,
        ),
        honest_sites=honest_sites,
    )
    return copy


def poisson_sample(num_records: int, rate: float, random_bytes: RandomBytes) -> np.ndarray:
    """Indices of the records that join this step: each independently with probability q."""
    return bernoulli_indices(num_records, rate, random_bytes)


def integer_gradient_sum(
    model: CrossAttentionMatcher,
    data: ImageTextDataset,
    *,
    indices: np.ndarray,
    keys: list[str],
    plan: DistributedDPPlan,
    clip_norm: float,
    num_distractors: int,
    tokenizer: HashingTokenizer,
    distractors: DistractorSettings | None = None,
) -> np.ndarray:
    """The randomly rounded sum over ``indices`` of each record's clipped gradient divided by
    gamma, each entry clipped to the plan's [-L, L] (int64)."""
    # heavy imports, only where gradients are computed
    from fedmm.client.caption_length_batches import split_by_caption_length
    from fedmm.client.per_example_gradients import PerExampleGradients

    shapes = model.state_dict()
    if indices.size == 0:
        return torch.zeros(sum(shapes[k].numel() for k in keys), dtype=torch.int64).numpy()
    dataset = MatchingDataset(
        data,
        tokenizer=tokenizer,
        num_distractors=num_distractors,
        seed=int.from_bytes(os.urandom(8), "little"),
        distractors=distractors,
    )
    sums = {key: torch.zeros(shapes[key].shape, dtype=torch.float64) for key in keys}
    generator = new_rounding_generator()
    model.train()
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([image for image, _ in items])
    tokens = torch.stack([token for _, token in items])
    with PerExampleGradients(model) as tape:
        # Groups cut to their longest caption (client.caption_length_batches: the same
        # per-example gradients, less padding), in micro-batches.
        for part in split_by_caption_length(images, tokens):
            for start in range(0, len(part.indices), MICRO_BATCH):
                chunk = slice(start, start + MICRO_BATCH)
                tape.backward(matching_loss(model(part.images[chunk], part.tokens[chunk])))
                norms = tape.squared_norms(torch.float64).sqrt()
                # Clip to C * (1 - 1e-6): float rounding cannot push a record past C.
                factor = torch.clamp(clip_norm * (1 - 1e-6) / (norms + 1e-12), max=1.0)
                for name, weighted in tape.weighted_sums(factor / plan.scale).items():
                    sums[name] += weighted
    total = torch.cat([sums[key].flatten() for key in keys])
    rounded = randomized_round(total, generator=generator).numpy()
    return np.clip(rounded, -plan.site_sum_bound, plan.site_sum_bound)


def _trainable_mask(model: CrossAttentionMatcher, keys: list[str]) -> np.ndarray:
    """Which entries of the flattened state dict are trainable parameters."""
    parameters = {name for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    return np.concatenate(
        [np.full(state[key].numel(), key in parameters, dtype=bool) for key in keys]
    )


def run_distributed_dp_step(
    *,
    global_state: dict[str, torch.Tensor],
    request: TrainRequest,
    plan: DistributedDPPlan,
    data: ImageTextDataset,
    policy: SitePrivacyPolicy,
    ledger: PrivacyLedger,
    bit_width: int,
    run_id: int = 0,
    persistent_ledger: bool = True,
    random_bytes: RandomBytes = os.urandom,
) -> DistributedStepOutcome:
    """One distributed-DP round at this site; ``ledger`` is updated in place when it takes
    part, and when it draws the run's noisy count (the caller saves it whenever it changed).
    A refusal's detail is for the site's log; only its code is sent."""
    unknown = unknown_run_refusal(
        ledger,
        run_id=run_id,
        server_round=request.server_round,
        persistent_ledger=persistent_ledger,
    )
    if unknown is not None:
        return DistributedStepOutcome(None, refusal=unknown)
    ledger.start_run(run_id)
    n = len(data)
    if n == 0:
        return DistributedStepOutcome(None, refusal=SiteRefusal(RefusalCode.NO_DATA, "no records"))
    privacy = effective_privacy(policy, request)
    if not privacy.private:
        return DistributedStepOutcome(
            None,
            refusal=SiteRefusal(
                RefusalCode.PRIVACY_POLICY, "distributed DP needs a finite epsilon"
            ),
        )
    if request.server_round in ledger.rounds:
        return DistributedStepOutcome(
            None,
            refusal=SiteRefusal(
                RefusalCode.ALREADY_TRAINED, f"round {request.server_round} already trained"
            ),
        )
    keys = list(global_state)
    model = CrossAttentionMatcher(request.model_config())
    model.load_state_dict(global_state)
    trainable = _trainable_mask(model, keys)
    dimension = int(trainable.sum())
    if plan.dimension != dimension:
        return DistributedStepOutcome(
            None,
            refusal=SiteRefusal(
                RefusalCode.BAD_REQUEST,
                f"plan dimension {plan.dimension} differs from the model's {dimension}",
            ),
        )
    tokenizer = HashingTokenizer.for_model(model.config)
    try:  # the caption bank's digest and every caption's distractors, before any spend
        distractors = request.distractor_settings()
        check_distractors(
            data, distractors, tokenizer=tokenizer, num_distractors=request.num_distractors
        )
    except ValueError as error:  # CaptionBankError, DistractorError
        return DistributedStepOutcome(
            None, refusal=SiteRefusal(RefusalCode.BAD_REQUEST, f"distractors: {error}")
        )
    honest = honest_sites_assumed(policy, plan)
    if plan.noise_multiplier(honest) < privacy.noise_multiplier_floor:
        return DistributedStepOutcome(
            None,
            refusal=SiteRefusal(
                RefusalCode.PRIVACY_POLICY,
                f"noise multiplier {plan.noise_multiplier(honest):.3f} with {honest} honest "
                f"shares is below this site's floor {privacy.noise_multiplier_floor:g}",
            ),
        )
    delta = ledger.budget_delta(privacy.delta)
    count_noise = max(policy.record_count_noise, plan.count_noise)
    refusal, projected = check_budget(
        plan=plan,
        ledger=ledger,
        privacy=privacy,
        delta=delta,
        honest_sites=honest,
        first_round_of_run=not ledger.rounds,
        count_noise=count_noise if ledger.noisy_count is None else None,
    )
    if refusal is not None:
        return DistributedStepOutcome(None, refusal=refusal)
    refusal = release_noisy_count(
        ledger,
        num_records=n,
        count_noise=count_noise,
        privacy=privacy,
        delta=delta,
        random_bytes=random_bytes,
        accountant=ACCOUNTANT,
    )
    if refusal is not None:
        return DistributedStepOutcome(None, refusal=refusal)
    count = public_count(ledger.noisy_count or 0.0)
    try:
        require_delta_below_one_over(count, delta)
    except PolicyRefusal as error:
        return DistributedStepOutcome(
            None, refusal=SiteRefusal(RefusalCode.PRIVACY_POLICY, str(error))
        )

    indices = poisson_sample(n, plan.sample_rate, random_bytes)
    summed = integer_gradient_sum(
        model,
        data,
        indices=indices,
        keys=keys,
        plan=plan,
        clip_norm=min(privacy.max_grad_norm, plan.clip_norm),
        num_distractors=request.num_distractors,
        tokenizer=tokenizer,
        distractors=distractors,
    )
    # Noise on the trainable coordinates only: buffers (fixed filters) get no gradient, and
    # their entries stay exactly 0, so the coordinator leaves them unchanged.
    summed[trainable] += skellam_share(plan.share_variance, dimension, random_bytes)
    integers = np.mod(summed, 1 << bit_width).astype(np.uint64)

    entry = plan.round_entry(honest, 1)
    ledger.delta = delta
    ledger.add_distributed_round(
        (entry.variance, entry.l1_sensitivity, entry.l2_sensitivity, entry.sample_rate, 1),
        honest_sites=honest,
    )
    ledger.rounds.append(request.server_round)
    return DistributedStepOutcome(
        integers=integers,
        num_records=count,
        epsilon=projected,
        epsilon_bound=privacy.epsilon,
        honest_sites=honest,
    )
