"""Randomized rounding of a site's sum: unbiased, and one record moves it by at most
D2 = c + sqrt(d) under the coupling the accounting relies on (same coins for both sums)."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmm.common.distributed_dp.plan import skellam_tail_bound
from fedmm.common.distributed_dp.rounding import (
    randomized_round,
    rounded_l1_bound,
    rounded_l2_bound,
)


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def test_rounding_is_unbiased() -> None:
    values = torch.tensor([0.25, -1.75, 3.5, 1e4 + 0.1])
    draws = torch.stack([randomized_round(values, generator=_generator(s)) for s in range(4000)])
    error = draws.to(torch.float64).mean(dim=0) - values.to(torch.float64)
    assert torch.all(error.abs() < 4 * 0.5 / math.sqrt(4000))


def test_one_record_moves_the_rounded_sum_by_at_most_the_sensitivity() -> None:
    rng = np.random.default_rng(3)
    d, c = 400, 64 * math.sqrt(400)
    l2 = rounded_l2_bound(integer_clip=c, dimension=d)
    l1 = rounded_l1_bound(l2_bound=l2, dimension=d)
    worst_l2 = worst_l1 = 0.0
    for seed in range(300):
        others = torch.from_numpy(rng.normal(0, 3 * c, d))
        record = torch.from_numpy(rng.normal(0, 1, d))
        record *= c / record.norm()  # a record at the clip
        with_record = randomized_round(others + record, generator=_generator(seed))
        without = randomized_round(others, generator=_generator(seed))
        shift = (with_record - without).to(torch.float64)
        worst_l2 = max(worst_l2, float(shift.norm()))
        worst_l1 = max(worst_l1, float(shift.abs().sum()))
    assert worst_l2 <= l2 and worst_l1 <= l1
    assert worst_l2 > c  # the bound is not vacuous: rounding does add to the record's norm


def test_noise_tail_bound() -> None:
    tail = skellam_tail_bound(variance=1e6, coordinates=50_000, failure=2.0**-40)
    assert 7_000 < tail < 10_000  # about 8.5 standard deviations


def test_clipping_a_rounded_sum_entry_wise_keeps_the_sensitivity() -> None:
    """Sites clip their rounded sums to [-L, L] (no wrap, decided at planning time): entry-wise
    clipping is 1-Lipschitz, so one record still moves the vector by at most D2 and D1."""
    rng = np.random.default_rng(5)
    d, c = 400, 64 * math.sqrt(400)
    l2 = rounded_l2_bound(integer_clip=c, dimension=d)
    l1 = rounded_l1_bound(l2_bound=l2, dimension=d)
    bound = int(2 * c)  # tight: many entries of the sum are clipped
    clipped_entries = 0
    for seed in range(200):
        others = torch.from_numpy(rng.normal(0, 3 * c, d))
        record = torch.from_numpy(rng.normal(0, 1, d))
        record *= c / record.norm()
        with_record = randomized_round(others + record, generator=_generator(seed))
        without = randomized_round(others, generator=_generator(seed))
        clipped_with = with_record.clamp(-bound, bound)
        clipped_without = without.clamp(-bound, bound)
        clipped_entries += int((with_record.abs() > bound).sum())
        shift = (clipped_with - clipped_without).to(torch.float64)
        assert float(shift.norm()) <= l2 and float(shift.abs().sum()) <= l1
    assert clipped_entries > 0
