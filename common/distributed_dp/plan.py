"""The public parameters of a distributed-DP run, shared by the coordinator and the sites.

One round is one DP-SGD step on the union of the sites' records (Poisson sampling at rate q
at every site; Abadi et al., CCS 2016): every site sums its sampled records' integer vectors
(``rounding``), adds a Skellam share of variance ``share_variance`` (``skellam``) and masks
the result in Z_(2^b) (SecAgg+). The shares are sized so that any ``min_honest_sites`` of them
carry the variance the run was calibrated for (``accounting.calibrate_variance``); a site
that assumes h honest survivors is guaranteed h * share_variance. The coordinator sends the
plan with every train request (its own record ``plan``, one field a parameter); a site
recomputes the sensitivities and its own epsilon from it and its own trust assumption, never
trusting the coordinator's arithmetic.

Each site also releases its record count once per run as a noisy count (Gaussian noise of
standard deviation ``count_noise`` records, at least; ``client.record_count``); the plan is
calibrated so that the run's rounds and that count together stay within ``epsilon``.

Modular wrap (Kairouz et al. ICML 2021; Agarwal et al. NeurIPS 2021, "modular clipping"):
wrapping is a deterministic function of the integer sum, so it cannot weaken the guarantee;
it would only corrupt the step. It is ruled out when the run is planned, from public numbers
only: every site clips each entry of its rounded sum to [-L, L] with L = ``site_sum_bound``
before adding its noise (clipping entry-wise is 1-Lipschitz in every coordinate, so one
record still moves a site's vector by at most D2 in L2 and D1 in L1), and L is chosen so that
n L plus a Chernoff tail of the summed noise (failure probability 2^-40 over all
coordinates) stays below 2^(b-1) for n sites (:func:`site_sum_bound`). No round has to be
discarded after the sites have been charged for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedmm.common.distributed_dp.accounting import SkellamRound, calibrate_variance, skellam_epsilon
from fedmm.common.distributed_dp.rounding import rounded_l1_bound, rounded_l2_bound

#: Integer clip c = INTEGER_CLIP_PER_ROOT_D * sqrt(d): rounding then adds sqrt(d) / c = 1/64
#: to the sensitivity D2 = c + sqrt(d) (1.6% more noise than unrounded DP-SGD).
INTEGER_CLIP_PER_ROOT_D = 64.0
WRAP_FAILURE_PROBABILITY = 2.0**-40
#: The record-count noise (standard deviation, records) a plan budgets for by default; the
#: same as a site policy's default ``record-count-noise``.
DEFAULT_COUNT_NOISE = 20.0


class PlanError(ValueError):
    """The run cannot be planned; the message names the setting to change."""


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
    count_noise: float = DEFAULT_COUNT_NOISE  # sigma_c the plan budgets for (records)
    site_sum_bound: int = 2**30  # L: each entry of a site's rounded sum is clipped to [-L, L]

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError("sample rate must be in (0, 1]")
        if self.num_rounds < 1 or self.dimension < 1 or self.min_honest_sites < 1:
            raise ValueError("rounds, dimension and honest sites must be >= 1")
        if not (self.clip_norm > 0 and self.integer_clip > 0 and self.share_variance > 0):
            raise ValueError("clip norms and share variance must be > 0")
        if not (math.isfinite(self.count_noise) and self.count_noise > 0):
            raise ValueError("count noise must be finite and > 0")
        if self.site_sum_bound < 1:
            raise ValueError("site sum bound must be >= 1")

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
        """Epsilon of the whole planned run (its rounds and one noisy record count at
        ``count_noise``) when ``honest_sites`` shares are in every sum."""
        return skellam_epsilon(
            [self.round_entry(honest_sites, self.num_rounds)],
            self.delta,
            count_noise=self.count_noise,
        )

    def noise_multiplier(self, honest_sites: int) -> float:
        """sqrt(guaranteed variance) / D2: comparable to DP-SGD's sigma."""
        return math.sqrt(honest_sites * self.share_variance) / self.l2_sensitivity

    def to_config(self) -> dict[str, Any]:
        """The plan as a ConfigRecord's content: one field a parameter, by its name."""
        return {f.name: v for f, v in _items(self)}

    @classmethod
    def from_config(cls, record: Any) -> DistributedDPPlan:
        """The plan in a request's ``plan`` record; ``ValueError`` names missing fields."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in record]
        if missing:
            raise ValueError(f"distributed-DP plan is missing {missing}")
        kinds = {f.name: (int if f.type in ("int", int) else float) for f in fields(cls)}
        return cls(**{name: kinds[name](record[name]) for name in names})


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
    num_sites: int | None = None,
    bit_width: int = 32,
    count_noise: float = DEFAULT_COUNT_NOISE,
    integer_clip: float | None = None,
) -> DistributedDPPlan:
    """Calibrate the noise: the smallest variance whose run (and one noisy record count at
    ``count_noise``) stays within ``epsilon`` when ``min_honest_sites`` shares are summed,
    split into equal shares; and the per-site clip L that rules out a wrap mod 2^b for
    ``num_sites`` sites (default: ``min_honest_sites``). Raises :class:`PlanError` when no
    L fits one record's contribution."""
    c = integer_clip or INTEGER_CLIP_PER_ROOT_D * math.sqrt(dimension)
    l2 = rounded_l2_bound(integer_clip=c, dimension=dimension)
    variance = calibrate_variance(
        epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=num_rounds,
        l1=rounded_l1_bound(l2_bound=l2, dimension=dimension),
        l2=l2,
        count_noise=count_noise,
    )
    sites = num_sites or min_honest_sites
    share_variance = variance / min_honest_sites
    bound = site_sum_bound(
        num_sites=sites, bit_width=bit_width, share_variance=share_variance, dimension=dimension
    )
    if bound < math.ceil(c) + 1:
        raise PlanError(
            f"a {bit_width}-bit ring leaves each of {sites} sites entries up to {bound}, less "
            f"than one record's integer clip {c:.0f}: raise secagg-bit-width"
        )
    return DistributedDPPlan(
        sample_rate=sample_rate,
        num_rounds=num_rounds,
        clip_norm=clip_norm,
        integer_clip=c,
        dimension=dimension,
        share_variance=share_variance,
        min_honest_sites=min_honest_sites,
        epsilon=epsilon,
        delta=delta,
        count_noise=count_noise,
        site_sum_bound=bound,
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


def site_sum_bound(*, num_sites: int, bit_width: int, share_variance: float, dimension: int) -> int:
    """L: the largest per-site entry bound with num_sites * L + t < 2^(b-1), where t bounds
    the summed noise of ``num_sites`` shares on every coordinate except with probability
    2^-40. Then the centred sum never wraps (but with that probability)."""
    noise = skellam_tail_bound(
        variance=num_sites * share_variance,
        coordinates=dimension,
        failure=WRAP_FAILURE_PROBABILITY,
    )
    return max(0, math.floor((2.0 ** (bit_width - 1) - 1 - noise) / num_sites))


def wrap_margin(plan: DistributedDPPlan, *, num_summed: int, bit_width: int) -> float:
    """2^(b-1) minus the bound on |entry| of the centred sum of ``num_summed`` sites' clipped
    vectors and noise; > 0 means no wrap (but with probability 2^-40)."""
    noise = skellam_tail_bound(
        variance=num_summed * plan.share_variance,
        coordinates=plan.dimension,
        failure=WRAP_FAILURE_PROBABILITY,
    )
    return 2.0 ** (bit_width - 1) - (num_summed * plan.site_sum_bound + noise)
