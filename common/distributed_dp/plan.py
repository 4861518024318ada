"""The public parameters of a distributed-DP run, shared by the coordinator and the sites.

One round is one DP-SGD step on the union of the sites' records (Poisson sampling at rate q
at every site; Abadi et al., CCS 2016): every site sums its sampled records' integer vectors
(``rounding``), adds a Skellam share of variance ``share_variance`` (``skellam``) and masks
the result in Z_(2^b) (SecAgg+). The shares are sized so that any ``min_honest_sites`` of them
carry the variance the run was calibrated for (``accounting.calibrate_variance``); a site
that assumes h honest survivors is guaranteed h * share_variance. The coordinator sends the
plan with every train request (keys ``ddp-*`` of the config record); a site recomputes the
sensitivities and its own epsilon from it and its own trust assumption, never trusting the
coordinator's arithmetic.

Modular wrap (Kairouz et al. ICML 2021; Agarwal et al. NeurIPS 2021, "modular clipping"):
wrapping is a deterministic function of the integer sum, so it cannot weaken the guarantee;
it would only corrupt the step. :func:`wrap_margin` bounds the largest |entry| of the true
sum: N c + n for N records and n sites (|scaled entries| <= c, one rounding a site) plus a Chernoff
tail of the noise with failure probability 2^-40 over all coordinates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from common.distributed_dp.accounting import SkellamRound, calibrate_variance, skellam_epsilon
from common.distributed_dp.rounding import rounded_l1_bound, rounded_l2_bound

CONFIG_PREFIX = "ddp-"
#: Integer clip c = INTEGER_CLIP_PER_ROOT_D * sqrt(d): rounding then adds sqrt(d) / c = 1/64
#: to the sensitivity D2 = c + sqrt(d) (1.6% more noise than unrounded DP-SGD).
INTEGER_CLIP_PER_ROOT_D = 64.0
WRAP_FAILURE_PROBABILITY = 2.0**-40


@dataclass(frozen=True)
class DistributedDPPlan:
    """What every site needs to take part in the run's distributed-DP rounds."""

    sample_rate: float  # q: each record joins a round's batch with this probability
    num_rounds: int  # T: DP-SGD steps the run plans (one per round)
    clip_norm: float  # C: per-record L2 clip, model units
    integer_clip: float  # c = C / gamma: the clip in integer units
    dimension: int  # d: model parameters
    share_variance: float  # Skellam variance each site adds per coordinate
    min_honest_sites: int  # h the shares are sized for
    epsilon: float  # the run's target epsilon (record-level, whole run)
    delta: float

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError("sample rate must be in (0, 1]")
        if self.num_rounds < 1 or self.dimension < 1 or self.min_honest_sites < 1:
            raise ValueError("rounds, dimension and honest sites must be >= 1")
        if not (self.clip_norm > 0 and self.integer_clip > 0 and self.share_variance > 0):
            raise ValueError("clip norms and share variance must be > 0")

    @property
    def scale(self) -> float:
        """gamma: one integer unit in model units."""
        return self.clip_norm / self.integer_clip

    @property
    def l2_sensitivity(self) -> float:
        return rounded_l2_bound(integer_clip=self.integer_clip, dimension=self.dimension)

    @property
    def l1_sensitivity(self) -> float:
        return rounded_l1_bound(l2_bound=self.l2_sensitivity, dimension=self.dimension)

    def round_entry(self, honest_sites: int, steps: int = 1) -> SkellamRound:
        """The ledger entry of ``steps`` rounds for a site assuming ``honest_sites``."""
        return SkellamRound(
            variance=honest_sites * self.share_variance,
            l1_sensitivity=self.l1_sensitivity,
            l2_sensitivity=self.l2_sensitivity,
            sample_rate=self.sample_rate,
            steps=steps,
        )

    def run_epsilon(self, honest_sites: int) -> float:
        """Epsilon of the whole planned run when ``honest_sites`` shares are in every sum."""
        return skellam_epsilon([self.round_entry(honest_sites, self.num_rounds)], self.delta)

    def noise_multiplier(self, honest_sites: int) -> float:
        """sqrt(guaranteed variance) / D2: comparable to DP-SGD's sigma."""
        return math.sqrt(honest_sites * self.share_variance) / self.l2_sensitivity

    def to_config(self) -> dict[str, Any]:
        return {CONFIG_PREFIX + f.name.replace("_", "-"): v for f, v in _items(self)}

    @classmethod
    def from_config(cls, record: Any) -> DistributedDPPlan | None:
        """The plan in a train config record, or None for a site-local DP round."""
        keys = {f.name: CONFIG_PREFIX + f.name.replace("_", "-") for f in fields(cls)}
        if not any(key in record for key in keys.values()):
            return None
        missing = [key for key in keys.values() if key not in record]
        if missing:
            raise ValueError(f"distributed-DP request is missing {missing}")
        kinds = {f.name: (int if f.type in ("int", int) else float) for f in fields(cls)}
        return cls(**{name: kinds[name](record[key]) for name, key in keys.items()})


def _items(plan: DistributedDPPlan) -> list[tuple[Any, Any]]:
    values = asdict(plan)
    return [(f, values[f.name]) for f in fields(plan)]


def plan_distributed_dp(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    num_rounds: int,
    clip_norm: float,
    dimension: int,
    min_honest_sites: int,
    integer_clip: float | None = None,
) -> DistributedDPPlan:
    """Calibrate the noise: the smallest variance whose run stays within ``epsilon`` when
    ``min_honest_sites`` shares are summed, split into equal shares."""
    c = integer_clip or INTEGER_CLIP_PER_ROOT_D * math.sqrt(dimension)
    l2 = rounded_l2_bound(integer_clip=c, dimension=dimension)
    variance = calibrate_variance(
        epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=num_rounds,
        l1=rounded_l1_bound(l2_bound=l2, dimension=dimension),
        l2=l2,
    )
    return DistributedDPPlan(
        sample_rate=sample_rate,
        num_rounds=num_rounds,
        clip_norm=clip_norm,
        integer_clip=c,
        dimension=dimension,
        share_variance=variance / min_honest_sites,
        min_honest_sites=min_honest_sites,
        epsilon=epsilon,
        delta=delta,
    )


def skellam_tail_bound(*, variance: float, coordinates: int, failure: float) -> float:
    """t with P(max_j |Sk_j| >= t) <= ``failure`` over ``coordinates`` Skellam(variance)
    entries (Chernoff: P(X >= t) <= exp(mu (sqrt(1 + (t/mu)^2) - 1) - t asinh(t/mu)))."""

    def log_tail(t: float) -> float:
        r = t / variance
        return variance * (math.sqrt(1 + r * r) - 1) - t * math.asinh(r)

    target = math.log(failure / (2 * coordinates))
    low, high = 0.0, max(1.0, math.sqrt(variance))
    while log_tail(high) > target:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if log_tail(middle) > target else (low, middle)
    return high


def wrap_margin(
    plan: DistributedDPPlan, *, total_records: int, num_summed: int, bit_width: int
) -> float:
    """2^(b-1) minus the bound on |entry| of the true integer sum; > 0 means no wrap (but
    with probability 2^-40)."""
    noise = skellam_tail_bound(
        variance=num_summed * plan.share_variance,
        coordinates=plan.dimension,
        failure=WRAP_FAILURE_PROBABILITY,
    )
    return 2.0 ** (bit_width - 1) - (total_records * plan.integer_clip + num_summed + noise)
