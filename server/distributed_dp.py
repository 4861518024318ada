"""The coordinator's side of distributed DP: plan the noise, apply the revealed noisy step.

Kairouz, Liu, Steinke (ICML 2021) and Agarwal, Kairouz, Liu (NeurIPS 2021): the coordinator
fixes the public parameters (``common.distributed_dp.plan``), SecAgg+ reveals only the sum
over sites of (integer gradient sum + Skellam share), and the coordinator rescales it into a
gradient estimate. Everything here is post-processing of that sum: the SGD step on the noisy
gradient, normalised by the expected batch q N (N: the total record count, revealed inside
the masked vector), spends no privacy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch

from fedmm.common.distributed_dp.plan import DistributedDPPlan, PlanError, plan_distributed_dp
from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.secagg.neighbour_graph import default_graph_parameters
from fedmm.server.secure_aggregation import SecAggSettings


def honest_sites_of(config: FederationConfig, num_sites: int) -> int:
    """h: the run's ``dp-min-honest-sites``; 0 (the default) means what SecAgg+ already
    tolerates, h = n - t + 1 with t the round's Shamir threshold (``secagg-threshold``, or
    the default for n sites): fewer than t sites colluding with the coordinator leave at
    least n - t + 1 honest ones, and a round survives up to t - 1 dropouts.

    The trade: each share carries 1/h of the calibrated variance, so with all n sites in the
    sum the noise is n/h times what the guarantee needs (h = n: exactly central DP-SGD's
    noise, but one colluding or dropped site voids the guarantee or the round); a smaller h
    trusts fewer sites and tolerates more dropouts for more noise."""
    if config.dp_min_honest_sites:
        return min(config.dp_min_honest_sites, num_sites)
    if num_sites < 2:  # no secure aggregation to speak of: every site
        return max(1, num_sites)
    threshold = config.secagg_threshold or default_graph_parameters(num_sites).threshold
    return max(1, num_sites - min(threshold, num_sites) + 1)


def plan_run(config: FederationConfig, *, dimension: int, num_sites: int) -> DistributedDPPlan:
    """Noise for ``num-server-rounds`` steps at rate q, epsilon and delta of the run (with
    each site's noisy record count), and the per-site clip that rules out a wrap mod 2^b;
    a run that cannot be planned is a config error naming the key to change."""
    try:
        return plan_distributed_dp(
            epsilon=config.epsilon,
            delta=config.delta,
            sample_rate=config.dp_sampling_rate,
            num_rounds=config.num_server_rounds,
            clip_norm=config.max_grad_norm,
            dimension=dimension,
            min_honest_sites=honest_sites_of(config, num_sites),
            num_sites=num_sites,
            bit_width=config.secagg_bit_width,
        )
    except PlanError as error:
        raise ConfigError(
            f"run config 'secagg-bit-width' = {config.secagg_bit_width} is too small for "
            f"distributed DP: {error}"
        ) from error


def secagg_settings(settings: SecAggSettings, plan: DistributedDPPlan) -> SecAggSettings:
    """SecAgg+ with integer inputs; discard a round with fewer than h survivors unmasked."""
    return dataclasses.replace(settings, integer_update=True, min_survivors=plan.min_honest_sites)


def noisy_gradient_step(
    weights: Mapping[str, torch.Tensor],
    summed: Mapping[str, np.ndarray],
    *,
    total_records: float,
    plan: DistributedDPPlan,
    learning_rate: float,
    momentum: float = 0.0,
    velocity: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One SGD step on the revealed noisy gradient g = gamma * S / (q N), with heavy-ball
    momentum as ``torch.optim.SGD`` (v <- momentum v + g; w <- w - lr v). ``velocity`` is
    updated in place when momentum is on (post-processing of earlier sums only; the
    coordinator checkpoints it so a resumed run keeps it)."""
    if not total_records > 0:
        raise ValueError("no records in the sum")
    factor = plan.scale / (plan.sample_rate * total_records)
    velocity = {} if velocity is None else velocity
    out = {}
    for key, weight in weights.items():
        gradient = factor * torch.from_numpy(np.asarray(summed[key])).to(weight.dtype)
        if momentum:
            if key in velocity:
                gradient = momentum * velocity[key] + gradient
            velocity[key] = gradient
        out[key] = weight - learning_rate * gradient
    return out


def privacy_statement(plan: DistributedDPPlan, *, num_sites: int) -> str:
    """The run's guarantee in plain words (report and summary)."""
    h = plan.min_honest_sites
    return (
        f"distributed DP under SecAgg+: record-level (epsilon = {plan.run_epsilon(h):.3f}, "
        f"delta = {plan.delta:g})-DP under add/remove of any one record anywhere in the "
        f"federation, for the whole run of {plan.num_rounds} rounds (one DP-SGD step per "
        f"round, Poisson sampling at q = {plan.sample_rate:g}, clip {plan.clip_norm:g}, "
        f"Skellam noise multiplier {plan.noise_multiplier(h):.3f}) and each site's noisy "
        f"record count (Gaussian, sigma >= {plan.count_noise:g} records); accountant: RDP of "
        "the Poisson-subsampled Skellam mechanism (Agarwal et al. 2021 Skellam RDP; binomial "
        "subsampling bound for symmetric shifts, common/distributed_dp/accounting.py) "
        "composed with the Gaussian mechanism of the count. Trust: holds while "
        f"at least {h} of the {num_sites} sites whose noise is in each sum are honest (follow "
        "the protocol and do not collude with the coordinator) and SecAgg+ reveals only the "
        "sum; each site checks this against its own policy and ledger, and a round with fewer "
        f"than {h} survivors is discarded before unmasking."
    )
