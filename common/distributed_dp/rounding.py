"""Scaling and randomized rounding of a site's sum of clipped gradients to integers.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021, Section 4: each record's gradient is clipped to L2 norm C
and divided by the scale gamma = C / c, so that one record contributes a vector s(x) of L2
norm at most c (in integer units); the real vector is then randomly rounded to integers,
floor(v_j) + Bernoulli(v_j - floor(v_j)) per coordinate (unbiased).

Here a site rounds the *sum* of its sampled records' scaled vectors once (not each record):
rounding d coordinates per record cost several milliseconds per record on this project's
CPUs, more than the gradient itself. Sensitivity of the rounded sum: couple the rounding of
S and of S + s(x) through the same uniforms u_j (their law does not depend on the data, so
each output distribution is the same mixture over u of shifted noise). For every u and j,
round(S_j + s_j) - round(S_j) lies strictly between s_j - 1 and s_j + 1, so the integer shift
has L2 norm < c + sqrt(d) and L1 norm <= sqrt(d) (c + sqrt(d)); by the joint quasi-convexity
of Renyi divergence (van Erven and Harremoes, IEEE Trans. IT 2014, Thm 13) the mixture's RDP
is at most the Skellam RDP of a shift with D2 = c + sqrt(d) and D1 = D2 min(sqrt(d), D2)
(an integer vector's L1 norm is at most its squared L2 norm). This is Kairouz et al.'s
unconditional bound D2 = c + sqrt(d); their conditional rounding would tighten it to about
sqrt(c^2 + d/4), which matters little when c >> sqrt(d) (``plan`` takes c = 64 sqrt(d): 1.6%).

No random rotation either: with a 32-bit ring the worst-case sum of N records, N (c + 1) per
coordinate, stays below 2^31 for this project's sizes (``plan.wrap_margin`` checks it).

The rounding coins come from a torch generator seeded with 63 bits of ``os.urandom``: they
need only be independent of the data; the privacy rests on the sensitivity bound, which holds
for every outcome of the coins, and on the Skellam noise.
"""

from __future__ import annotations

import math
import os

import torch


def rounded_l2_bound(*, integer_clip: float, dimension: int) -> float:
    """D2 = c + sqrt(d): the L2 sensitivity of a randomly rounded sum (one record's part)."""
    if not integer_clip > 0 or dimension < 1:
        raise ValueError("integer clip must be > 0 and dimension >= 1")
    return float(integer_clip) + math.sqrt(dimension)


def rounded_l1_bound(*, l2_bound: float, dimension: int) -> float:
    """D1 of an integer vector with L2 norm <= ``l2_bound`` in ``dimension`` coordinates."""
    return l2_bound * min(math.sqrt(dimension), l2_bound)


def new_rounding_generator() -> torch.Generator:
    """A torch generator for rounding coins, seeded from ``os.urandom``."""
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def randomized_round(values: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Unbiased randomized rounding of a float64 vector to int64."""
    real = values.to(torch.float64)
    floor = torch.floor(real)
    coins = torch.rand(real.shape, generator=generator, dtype=torch.float64)
    return (floor + (coins < real - floor)).to(torch.int64)
