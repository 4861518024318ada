"""RDP accounting of the Poisson-subsampled Skellam mechanism, composed over rounds.

Mechanism: one round releases sum_{x in batch} round(clip(g(x)) / gamma) + Sk(mu), where the
batch is a Poisson sample (rate q) of the union of the sites' records and Sk(mu) is the
symmetric Skellam noise of variance mu per coordinate (Poisson(mu/2) - Poisson(mu/2)).

- Skellam RDP (Agarwal, Kairouz, Liu, NeurIPS 2021, Theorem 3.5 / Corollary 3.6): for an
  integer query with L1 and L2 sensitivities D1, D2 and integer order alpha > 1,

      eps(alpha) <= alpha D2^2 / (2 mu) + min( ((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),
                                                3 D1 / (2 mu) ).

  The first term is the Gaussian mechanism's with variance mu; the rest is the discrete
  surcharge, negligible when mu >> D2 (our integer scale makes D2 in the thousands).
- Poisson subsampling (add/remove one record), integer order alpha: the binomial expansion

      e^{(alpha-1) eps'(alpha)} <= sum_{k=0}^{alpha} C(alpha,k) (1-q)^(alpha-k) q^k e^{(k-1) eps(k)}

  (eps(0) = eps(1) = 0 terms: (1-q)^(alpha-1) (1 + (alpha-1) q)), never more than the
  unsampled RDP. For the "remove" direction the expansion is an identity for any pair of laws
  (it is how Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019, compute the Gaussian's). Zhu and Wang's bound for an arbitrary mechanism
  ("Poisson Subsampled Renyi Differential Privacy", ICML 2019, Theorem 6), which this project
  used before, multiplies every term k >= 3 by 3 to cover the other direction.
  Why it holds here in both directions. By Poisson sampling and the rounding coupling of
  ``rounding`` (the coins are data-independent), the two output laws for neighbours
  D' = D + {x} are mixtures over the same index (sample S of D, coins u) of
  (1-q) P + q Q and of P, where P = Sk + a and Q = Sk + a + Delta: the product Skellam law
  shifted by integer vectors, ||Delta||_2 <= D2, ||Delta||_1 <= D1. The map
  Phi(A, B) = sum A^alpha B^(1-alpha) is jointly convex (a perspective), so it suffices to
  bound each pair. "Remove": sum P^(1-alpha) ((1-q)P + qQ)^alpha expands into the sum above
  with sum P^(1-k) Q^k = e^{(k-1) D_k(Q||P)} <= e^{(k-1) eps(k)}. "Add",
  sum P^alpha ((1-q)P + qQ)^(1-alpha), is never larger, because the pair is symmetric:
  T(z) = 2a + Delta - z maps P to Q and Q to P (Skellam is symmetric about 0). Group the
  outcomes in orbits {z, T z}; with t = Q(z)/P(z) (t >= 1 for one of the two),
  X = 1 - q + q t and Y = 1 - q + q/t = 1 - e with e = q (t-1)/t, the orbit's share is
  P(z) (X^alpha + t Y^alpha) for "remove" and P(z) (X^(1-alpha) + t Y^(1-alpha)) for "add".
  So it suffices that F(1 + t e) >= t G(e) with F(w) = w^alpha - w^(1-alpha) and
  G(e) = (1-e)^(1-alpha) - (1-e)^alpha, for t >= t0 = 1/(1-e) (that is q <= 1). At t0 (q = 1)
  both sides are equal; H(t) = F(1 + t e) - t G(e) is convex in t (F'' >= 0 on [1, inf));
  and H'(t0) = w^(1-alpha) K(w) with w = 1 - e and
  K(w) = (alpha-1) - alpha w + alpha w^(2 alpha - 1) - (alpha-1) w^(2 alpha), which is convex
  on [0, 1] with K(1) = K'(1) = 0, so K >= 0. Hence H >= 0. The tests check this inequality,
  the orbit argument on random symmetric pairs (and that it fails without the symmetry), and
  the bound against the exact RDP of a subsampled one-dimensional Skellam pair.
  With the symmetric pair and the binomial expansion, this accountant's epsilon stays within
  1% of central DP-SGD's (dp-accounting, sampled Gaussian) at the same q, z and steps.
- Composition over T rounds adds RDP; conversion to (epsilon, delta) uses the bound of
  Canonne, Kamath, Steinke (NeurIPS 2020, Prop. 12; Asoodeh et al. 2020), as Opacus and
  dp-accounting do: eps = rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha).

The unit is one record (add/remove one record anywhere in the federation).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

#: Integer Renyi orders (as google-research/federated distributed_dp).
RDP_ORDERS: tuple[int, ...] = (*range(2, 129), 256)


@dataclass(frozen=True)
class SkellamRound:
    """One kind of round in a ledger: ``steps`` rounds of the same subsampled mechanism."""

    variance: float  # mu: Skellam variance per coordinate guaranteed in the sum (integer units)
    l1_sensitivity: float
    l2_sensitivity: float
    sample_rate: float
    steps: int


def skellam_rdp(order: int, *, variance: float, l1: float, l2: float) -> float:
    """RDP of the multi-dimensional Skellam mechanism (Agarwal et al. 2021, Thm 3.5)."""
    if order < 2 or int(order) != order:
        raise ValueError("order must be an integer >= 2")
    if not variance > 0:
        raise ValueError("variance must be > 0")
    a, mu = float(order), float(variance)
    surcharge = min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return a * l2**2 / (2 * mu) + surcharge


def poisson_subsampled_rdp(order: int, *, sample_rate: float, rdp: Callable[[int], float]) -> float:
    """RDP at integer ``order`` of a symmetric shift mechanism after Poisson sampling at rate q.

    1/(alpha-1) log[ (1-q)^(alpha-1) (1 + (alpha-1) q)
                     + sum_{k=2}^{alpha} C(alpha,k) (1-q)^(alpha-k) q^k e^{(k-1) eps(k)} ],
    and never more than the unsampled ``rdp(order)``. Valid for both add and remove when each
    pair of output laws is an integer shift of a law symmetric about its centre (module
    docstring); ``rdp(k)`` must bound D_k of the unsampled pair.
    """
    q, alpha = float(sample_rate), int(order)
    if not 0 < q <= 1:
        raise ValueError("sample rate must be in (0, 1]")
    if q == 1:
        return rdp(alpha)
    ells = np.arange(2, alpha + 1)
    eps = np.array([rdp(int(ell)) for ell in ells])
    log_terms = (
        _log_comb_array(alpha, ells)
        + (alpha - ells) * math.log1p(-q)
        + ells * math.log(q)
        + (ells - 1) * eps
    )
    first = (alpha - 1) * math.log1p(-q) + math.log1p((alpha - 1) * q)
    terms = np.concatenate([[first], log_terms])
    top = float(terms.max())
    bound = (top + math.log(float(np.exp(terms - top).sum()))) / (alpha - 1)
    return min(bound, rdp(alpha))


def rounds_rdp(rounds: Sequence[SkellamRound], orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """RDP at each order of the composition of all ``rounds``."""
    total = np.zeros(len(orders))
    for entry in rounds:
        if entry.steps <= 0:
            continue
        one_step = _step_rdp(
            entry.variance,
            entry.l1_sensitivity,
            entry.l2_sensitivity,
            entry.sample_rate,
            tuple(orders),
        )
        total += entry.steps * np.asarray(one_step)
    return total


@functools.lru_cache(maxsize=64)
def _step_rdp(
    variance: float, l1: float, l2: float, sample_rate: float, orders: tuple[int, ...]
) -> tuple[float, ...]:
    """One round's RDP at each order (cached: a run repeats the same mechanism every round)."""
    table = {
        ell: skellam_rdp(ell, variance=variance, l1=l1, l2=l2) for ell in range(2, max(orders) + 1)
    }
    return tuple(
        poisson_subsampled_rdp(a, sample_rate=sample_rate, rdp=table.__getitem__) for a in orders
    )


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
    """(epsilon, delta)-DP from RDP (Canonne, Kamath, Steinke 2020, Prop. 12)."""
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    best = math.inf
    for value, order in zip(rdp, orders, strict=True):
        a = float(order)
        if a <= 1 or not math.isfinite(value):
            continue
        eps = value - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, max(eps, 0.0))
    return best


def skellam_epsilon(
    rounds: Sequence[SkellamRound], delta: float, *, count_noise: float | None = None
) -> float:
    """Epsilon of ``rounds`` at ``delta`` (0 for no rounds), composed with one noisy record
    count of standard deviation ``count_noise`` when given."""
    if not any(entry.steps > 0 for entry in rounds) and count_noise is None:
        return 0.0
    rdp = rounds_rdp(rounds)
    if count_noise is not None:
        rdp = rdp + gaussian_rdp(count_noise)
    return epsilon_from_rdp(rdp, RDP_ORDERS, delta)


def gaussian_rdp(noise_multiplier: float, orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """RDP of the Gaussian mechanism with sensitivity 1 and standard deviation
    ``noise_multiplier`` at each order: alpha / (2 sigma^2) (Mironov 2017, Prop. 7); a site's
    noisy record count."""
    if not noise_multiplier > 0:
        raise ValueError("noise multiplier must be > 0")
    return np.asarray(orders, dtype=float) / (2.0 * noise_multiplier**2)


def calibrate_variance(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    l1: float,
    l2: float,
    count_noise: float | None = None,
    relative_tolerance: float = 1e-4,
) -> float:
    """The smallest Skellam variance (to ``relative_tolerance``) whose ``steps`` rounds, with
    one noisy record count of standard deviation ``count_noise`` when given, stay within
    ``epsilon``; bisection on the noise multiplier sqrt(variance) / l2."""

    def eps_at(multiplier: float) -> float:
        round_ = SkellamRound((multiplier * l2) ** 2, l1, l2, sample_rate, steps)
        return skellam_epsilon([round_], delta, count_noise=count_noise)

    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError("epsilon must be finite and > 0")
    low, high = 0.05, 1.0
    while eps_at(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {epsilon:g} is out of reach")
    while (high - low) / high > relative_tolerance:
        middle = (low + high) / 2
        if eps_at(middle) > epsilon:
            low = middle
        else:
            high = middle
    return (high * l2) ** 2


def _log_comb_array(n: int, k: np.ndarray) -> np.ndarray:
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
