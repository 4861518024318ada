"""A site's record count, released only as a differentially private noisy count.

A site's record count is not public: it is the FedAvg weight, the sampling rate follows from
it, and with it known the add/remove guarantee of DP-SGD degrades to replace-one. So once per
run a site draws

    n~ = n + N(0, sigma_c^2)

(the Gaussian mechanism on a count of L2 sensitivity 1 under add/remove; Dwork and Roth,
"The Algorithmic Foundations of Differential Privacy", 2014, Sec. 3.5; its RDP is
alpha / (2 sigma_c^2), Mironov 2017), charges it to its ledger, and derives everything that
depends on its size from n~ only: the public count max(1, round(n~)) (the FedAvg and SecAgg+
weight, capped there at the round's maximum weight; the count slot of distributed DP), the
Poisson rate and steps of DP-SGD, and the check that delta is below 1/count. Everything so
derived is post-processing of n~. The normal deviate comes from the CSPRNG
(``common.secure_random.standard_normals``).
"""

from __future__ import annotations

import math

import numpy as np

from fedmm.common.secure_random import RandomBytes, standard_normals


def draw_noisy_count(num_records: int, *, count_noise: float, random_bytes: RandomBytes) -> float:
    """n + N(0, ``count_noise``^2), one draw of the CSPRNG."""
    if not (math.isfinite(count_noise) and count_noise > 0):
        raise ValueError(f"count noise must be finite and > 0, got {count_noise}")
    return float(num_records + count_noise * standard_normals(1, random_bytes)[0])


def public_count(noisy_count: float) -> int:
    """The count a site uses and sends: ``max(1, round(n~))`` (post-processing of n~)."""
    return max(1, int(np.rint(noisy_count)))
