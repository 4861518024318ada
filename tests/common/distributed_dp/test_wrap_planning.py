"""A distributed-DP sum cannot wrap mod 2^b, decided when the run is planned, from public
numbers only: no round is discarded after the sites were charged for it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedmm.client.distributed_dp_step import integer_gradient_sum
from fedmm.common.distributed_dp.plan import (
    PlanError,
    plan_distributed_dp,
    site_sum_bound,
    skellam_tail_bound,
    wrap_margin,
)
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer

DIMENSION = 49_024  # the benchmark model's trainable entries


def _plan(**overrides):
    values = dict(
        epsilon=3.0,
        delta=1e-5,
        sample_rate=0.05,
        num_rounds=280,
        clip_norm=1.0,
        dimension=DIMENSION,
        min_honest_sites=9,
        num_sites=10,
        bit_width=32,
    )
    return plan_distributed_dp(**{**values, **overrides})


def test_the_planned_bound_leaves_no_room_for_a_wrap() -> None:
    plan = _plan()
    # n L + the summed noise tail stays below 2^(b-1), for every number of survivors.
    for summed in range(1, 11):
        assert wrap_margin(plan, num_summed=summed, bit_width=32) > 0
    tail = skellam_tail_bound(
        variance=10 * plan.share_variance, coordinates=DIMENSION, failure=2.0**-40
    )
    assert 10 * plan.site_sum_bound + tail < 2**31
    assert 10 * (plan.site_sum_bound + 1) + tail >= 2**31 - 1  # the largest such L
    # Room for thousands of records per site at the clip on one coordinate.
    assert plan.site_sum_bound > 10_000 * plan.integer_clip


def test_a_ring_too_small_for_one_record_is_refused_at_planning_time() -> None:
    with pytest.raises(PlanError, match="secagg-bit-width"):
        _plan(bit_width=18)
    bound = site_sum_bound(num_sites=10, bit_width=18, share_variance=1.0, dimension=DIMENSION)
    assert bound < 64 * math.sqrt(DIMENSION)


def test_the_coordinator_plans_the_wrap_check_and_names_the_key() -> None:
    from fedmm.common.federation_config import ConfigError, FederationConfig
    from fedmm.server.distributed_dp import plan_run

    config = FederationConfig(dp_mode="distributed", secagg_bit_width=18)
    with pytest.raises(ConfigError, match="secagg-bit-width"):
        plan_run(config, dimension=DIMENSION, num_sites=10)
    plan = plan_run(FederationConfig(dp_mode="distributed"), dimension=DIMENSION, num_sites=10)
    assert wrap_margin(plan, num_summed=10, bit_width=32) > 0


def test_a_site_clips_its_rounded_sum_to_the_planned_bound() -> None:
    from fedmm.common.data.dataset import ImageTextDataset

    torch.manual_seed(0)
    model = CrossAttentionMatcher(ModelConfig(width=8, heads=2))
    dimension = sum(p.numel() for p in model.parameters())
    plan = _plan(dimension=dimension, num_sites=2, min_honest_sites=2)
    tight = dataclasses.replace(plan, site_sum_bound=3)
    rng = np.random.default_rng(0)
    n = 64
    data = ImageTextDataset(
        images=rng.integers(0, 255, (n, 28, 56), dtype=np.uint8),
        captions=["a dark shirt on the left and a sandal on the right"] * n,
        labels=np.zeros(n, dtype=np.int64),
    )
    summed = integer_gradient_sum(
        model,
        data,
        indices=np.arange(n),
        keys=list(model.state_dict()),
        plan=tight,
        clip_norm=1.0,
        num_distractors=2,
        tokenizer=HashingTokenizer(
            max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
        ),
    )
    assert np.abs(summed).max() == 3  # clipped, and the clip was needed
