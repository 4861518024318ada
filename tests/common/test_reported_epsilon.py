"""A site's epsilon as it travels in the clear: rounded up to a 0.01 grid, never down."""

from __future__ import annotations

import math

import pytest

from fedmm.common.secure_round import reported_epsilon


@pytest.mark.parametrize(
    ("epsilon", "reported"),
    [(0.691, 0.7), (0.7, 0.7), (0.7000001, 0.71), (2.996, 3.0), (3.0, 3.0), (0.0, 0.0)],
)
def test_rounded_up_to_the_grid(epsilon: float, reported: float) -> None:
    assert reported_epsilon(epsilon) == reported


def test_every_grid_value_is_the_shortest_decimal_and_never_below_epsilon() -> None:
    for steps in range(1, 2001):
        epsilon = steps / 100
        value = reported_epsilon(epsilon)
        assert repr(value) == repr(round(epsilon, 2))  # no 0.7000000000000001 in reports
        assert value >= epsilon - 1e-9
        assert reported_epsilon(epsilon + 1e-6) > epsilon


def test_no_dp_is_reported_as_inf() -> None:
    assert math.isinf(reported_epsilon(math.inf))
