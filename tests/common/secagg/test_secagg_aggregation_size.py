"""The minimum aggregation size: max(min-sites, ceil(gamma n) + 2, h), never below 3 by
default, so a sum always hides each honest input among at least two honest ones."""

import pytest

from fedmm.common.secagg.aggregation_size import (
    MIN_AGGREGATION_SIZE,
    colluding_sites,
    describe_minimum,
    minimum_aggregation_size,
)


@pytest.mark.parametrize(
    ("sampled", "fraction", "expected"),
    [(2, 0.1, 3), (3, 0.0, 3), (10, 0.1, 3), (20, 0.1, 4), (40, 0.1, 6), (100, 0.1, 12)],
)
def test_a_sum_keeps_two_honest_sites_beyond_the_colluders(
    sampled: int, fraction: float, expected: int
) -> None:
    minimum = minimum_aggregation_size(
        num_sampled=sampled, colluding_fraction=fraction, min_sites=MIN_AGGREGATION_SIZE
    )
    assert minimum == expected
    assert minimum - colluding_sites(fraction=fraction, num_sampled=sampled) >= 2


def test_the_sites_own_minimum_and_distributed_dp_raise_it() -> None:
    assert minimum_aggregation_size(num_sampled=10, colluding_fraction=0.1, min_sites=5) == 5
    assert (
        minimum_aggregation_size(
            num_sampled=10, colluding_fraction=0.1, min_sites=3, honest_sites=8
        )
        == 8
    )
    text = describe_minimum(num_sampled=10, colluding_fraction=0.1, min_sites=3, honest_sites=8)
    assert text.startswith("minimum aggregation size 8 = max(min-sites 3")
    assert "8 honest sites assumed by distributed DP" in text


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="min_sites"):
        minimum_aggregation_size(num_sampled=10, colluding_fraction=0.1, min_sites=1)
    with pytest.raises(ValueError, match="colluding fraction"):
        colluding_sites(fraction=1.0, num_sampled=10)
