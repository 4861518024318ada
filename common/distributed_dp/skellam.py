"""Skellam noise shares from a cryptographically secure source.

The symmetric Skellam distribution of variance mu is Poisson(mu/2) - Poisson(mu/2); a sum of
independent Skellam variables is Skellam with the summed variance, so n sites that each add
a share of variance mu/n put exactly Sk(mu) into the securely aggregated sum (Agarwal,
Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
NeurIPS 2021, Section 3).

Randomness: uniform bits from ``os.urandom`` (or, for reproducible tests, an AES-256-CTR
keystream from ``cryptography``; both in ``common.secure_random``); never numpy's generators
and never a seed the coordinator knows. Each uniform u = (2m + 1) / 2^53 with m a 52-bit
integer, so u and 1 - u are both exact in float64. A Poisson(lam) sample is the exact
inverse of the CDF, X = min{k : F(k) >= u}, where F is scipy's regularised incomplete gamma
(``scipy.special.pdtr``) in the lower half and its complement (``pdtrc``, compared with
1 - u) in the upper half, so that tail probabilities keep their relative precision. A
Cornish-Fisher guess puts k within one step almost always; the search then moves each entry
until the inverse-CDF condition holds, so the result does not depend on the guess.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import special

from fedmm.common.secure_random import RandomBytes, aes_ctr_random_bytes, secure_uniforms

__all__ = [
    "RandomBytes",
    "aes_ctr_random_bytes",
    "poisson_by_inversion",
    "secure_uniforms",
    "skellam_share",
]

_MAX_SEARCH_STEPS = 100_000


def poisson_by_inversion(
    mean: float, count: int, random_bytes: RandomBytes = os.urandom
) -> np.ndarray:
    """``count`` Poisson(mean) samples (int64) by exact CDF inversion of secure uniforms."""
    if not (np.isfinite(mean) and mean >= 0):
        raise ValueError("mean must be finite and >= 0")
    if count == 0 or mean == 0:
        return np.zeros(count, dtype=np.int64)
    u, v = secure_uniforms(count, random_bytes)
    upper_half = u > 0.5
    z = np.where(upper_half, -special.ndtri(v), special.ndtri(u))
    skew = 1.0 / np.sqrt(mean)
    w = z + (z * z - 1) * skew / 6 + (z**3 - 3 * z) / (24 * mean) - (2 * z**3 - 5 * z) / (36 * mean)
    k = np.maximum(np.floor(mean + np.sqrt(mean) * w), 0.0)

    def reached(ks: np.ndarray, index: np.ndarray) -> np.ndarray:
        """F(k) >= u for the entries ``index`` (k < 0 never reaches)."""
        out = np.zeros(len(index), dtype=bool)
        valid = ks >= 0
        hi = upper_half[index] & valid
        lo = ~upper_half[index] & valid
        out[hi] = special.pdtrc(ks[hi], mean) <= v[index][hi]
        out[lo] = special.pdtr(ks[lo], mean) >= u[index][lo]
        return out

    everything = np.arange(count)
    # Up: while F(k) < u, k += 1.
    todo = everything[~reached(k, everything)]
    for _ in range(_MAX_SEARCH_STEPS):
        if todo.size == 0:
            break
        k[todo] += 1
        todo = todo[~reached(k[todo], todo)]
    else:
        raise RuntimeError("Poisson inversion did not converge")
    # Down: while F(k - 1) >= u, k -= 1 (now F(k) >= u holds everywhere).
    todo = everything[reached(k - 1, everything)]
    for _ in range(_MAX_SEARCH_STEPS):
        if todo.size == 0:
            break
        k[todo] -= 1
        todo = todo[reached(k[todo] - 1, todo)]
    else:
        raise RuntimeError("Poisson inversion did not converge")
    return k.astype(np.int64)


def skellam_share(
    variance: float, count: int, random_bytes: RandomBytes = os.urandom
) -> np.ndarray:
    """``count`` symmetric Skellam samples of the given variance (int64):
    Poisson(variance/2) - Poisson(variance/2)."""
    if not (np.isfinite(variance) and variance >= 0):
        raise ValueError("variance must be finite and >= 0")
    first = poisson_by_inversion(variance / 2, count, random_bytes)
    return first - poisson_by_inversion(variance / 2, count, random_bytes)
