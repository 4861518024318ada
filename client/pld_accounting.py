"""Epsilon of a site's DP-SGD history by a privacy-loss-distribution (PLD) accountant.

The site's ledger accounts with RDP (``client.privacy_ledger``). A PLD accountant composes
the same mechanisms numerically and tightly (Koskela, Jalko and Honkela, AISTATS 2020;
Google's ``dp-accounting``: Doroshenko et al., "Connect the Dots", PETS 2022), and gives a
smaller epsilon for the same noise, so the same epsilon with less noise.

Valid for exactly the mechanisms the ledger holds, under the ledger's unit (add or remove
one record):

- a DP-SGD entry ``(sigma, q, steps)``: ``steps`` Poisson-subsampled Gaussian mechanisms,
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``: each record joins a step
  independently with probability q (the site's CSPRNG sampler, ``client.secure_dp_sgd``),
  the clipped sum gets N(0, (sigma C)^2) noise;
- a noisy-count entry ``(sigma_c, 1.0, 1)``: the Gaussian mechanism on a count of
  sensitivity 1, ``GaussianDpEvent(sigma_c)``.

``dp-accounting``'s PLD accountant uses the pessimistic discretisation of the privacy loss
(its epsilon is an upper bound), at ``VALUE_DISCRETIZATION`` in the loss. Distributed-DP
(Skellam) rounds have no PLD here: histories that hold them stay with RDP.
"""

from __future__ import annotations

import math

#: Discretisation interval of the privacy loss (dp-accounting's default is 1e-4).
VALUE_DISCRETIZATION = 1e-4


def pld_epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of ``history`` (ledger entries) by dp-accounting's PLD accountant."""
    if not history:
        return 0.0
    import dp_accounting
    from dp_accounting import pld

    accountant = pld.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    for sigma, rate, steps in history:
        if not (sigma > 0 and 0 < rate <= 1 and steps >= 0):
            raise ValueError(f"bad ledger entry (sigma, q, steps) = {(sigma, rate, steps)}")
        gaussian = dp_accounting.GaussianDpEvent(float(sigma))
        event = gaussian if rate == 1.0 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
        accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier_pld(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    spent: list[tuple[float, float, int]] | None = None,
    relative_tolerance: float = 1e-3,
) -> float:
    """The smallest sigma (to ``relative_tolerance``) such that ``spent`` followed by
    ``steps`` steps at ``sample_rate`` stays within ``epsilon`` under the PLD accountant
    (the same search as ``privacy_ledger.calibrate_noise_multiplier``)."""
    if not math.isfinite(epsilon):
        return 0.0
    from fedmm.client.privacy_ledger import smallest_noise_multiplier

    history = list(spent or [])
    return smallest_noise_multiplier(
        lambda sigma: pld_epsilon_of([*history, (sigma, sample_rate, steps)], delta),
        epsilon=epsilon,
        relative_tolerance=relative_tolerance,
        spent_by="the history",
    )
