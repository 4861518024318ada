import numpy as np
import pytest

from fedmm.common.secagg.quantisation import (
    QuantisationRange,
    dequantise_sum,
    levels_with_headroom,
    new_rounding_generator,
    quantisation_error_bound,
    quantise,
)
from fedmm.common.secagg.ring import add_in_place, zeros


def test_headroom_keeps_the_sum_of_n_maximal_values_below_the_modulus() -> None:
    for bit_width, sites in [(8, 3), (16, 50), (32, 50), (32, 1000), (53, 7)]:
        levels = levels_with_headroom(bit_width=bit_width, max_summands=sites)
        assert sites * levels <= (1 << bit_width) - 1
        assert sites * (levels + 1) > (1 << bit_width) - 1  # and L is the largest such


def test_sum_of_extreme_values_does_not_wrap() -> None:
    bit_width, sites = 16, 9
    value_range = QuantisationRange(
        lower=-1.0, upper=1.0, levels=levels_with_headroom(bit_width=bit_width, max_summands=sites)
    )
    rng = np.random.default_rng(1)
    total = zeros(4, bit_width=bit_width)
    for _ in range(sites):
        add_in_place(
            total,
            quantise(values=np.full(4, 5.0), value_range=value_range, bit_width=bit_width, rng=rng),
            bit_width=bit_width,
        )
    assert np.allclose(
        dequantise_sum(quantised_sum=total, value_range=value_range, num_summed=sites), 9.0
    )


@pytest.mark.parametrize(("bit_width", "sites"), [(12, 2), (16, 10), (32, 50)])
def test_error_of_a_dequantised_sum_stays_within_the_bound(bit_width: int, sites: int) -> None:
    rng = np.random.default_rng(bit_width)
    value_range = QuantisationRange(
        lower=-3.0, upper=2.0, levels=levels_with_headroom(bit_width=bit_width, max_summands=sites)
    )
    vectors = [rng.uniform(-4, 3, 5000) for _ in range(sites)]
    total = zeros(5000, bit_width=bit_width)
    for vector in vectors:
        add_in_place(
            total,
            quantise(values=vector, value_range=value_range, bit_width=bit_width, rng=rng),
            bit_width=bit_width,
        )
    exact = sum(np.clip(vector, -3.0, 2.0) for vector in vectors)
    error = np.abs(
        dequantise_sum(quantised_sum=total, value_range=value_range, num_summed=sites) - exact
    )
    bound = quantisation_error_bound(value_range=value_range, num_summed=sites)
    assert error.max() <= bound
    # The bound is not vacuous: a coarse ring gives errors of the order of a step.
    if bit_width == 12:
        assert error.max() > 0.1 * value_range.step


def test_stochastic_rounding_is_unbiased() -> None:
    value_range = QuantisationRange(lower=0.0, upper=1.0, levels=4)  # steps of 0.25
    values = np.full(200_000, 0.1)  # 0.4 of a step
    rounded = quantise(
        values=values, value_range=value_range, bit_width=8, rng=np.random.default_rng(3)
    )
    assert set(np.unique(rounded).tolist()) == {0, 1}
    assert abs(float(rounded.mean()) * value_range.step - 0.1) < 0.002


def test_values_are_clipped_and_integers_on_the_grid_are_exact() -> None:
    value_range = QuantisationRange(lower=0.0, upper=10.0, levels=10)
    rounded = quantise(
        values=np.array([-5.0, 0.0, 3.0, 10.0, 99.0]),
        value_range=value_range,
        bit_width=8,
        rng=new_rounding_generator(),
    )
    assert rounded.tolist() == [0, 0, 3, 10, 10]


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="exceed"):
        QuantisationRange(lower=1.0, upper=1.0, levels=3)
    with pytest.raises(ValueError, match="finite"):
        quantise(
            values=np.array([np.nan]),
            value_range=QuantisationRange(lower=0, upper=1, levels=2),
            bit_width=8,
            rng=new_rounding_generator(),
        )
    with pytest.raises(ValueError, match="do not fit"):
        levels_with_headroom(bit_width=8, max_summands=300)


def test_quantising_into_a_given_vector_writes_the_same_values_there() -> None:
    value_range = QuantisationRange(lower=-2.0, upper=2.0, levels=1000)
    values = np.random.default_rng(3).normal(0.0, 1.0, 5000)
    fresh = quantise(
        values=values, value_range=value_range, bit_width=16, rng=np.random.default_rng(9)
    )
    target = np.full(5002, 7, dtype=np.uint32)
    written = quantise(
        values=values,
        value_range=value_range,
        bit_width=16,
        rng=np.random.default_rng(9),
        out=target[1:-1],
    )
    assert np.array_equal(written, fresh) and np.array_equal(target[1:-1], fresh)
    assert target[0] == target[-1] == 7
    with pytest.raises(ValueError, match="out must be"):
        quantise(
            values=values,
            value_range=value_range,
            bit_width=16,
            rng=np.random.default_rng(9),
            out=np.empty(5000, dtype=np.uint64),
        )


def test_long_and_shaped_inputs_are_quantised_whole_and_non_finite_values_anywhere_fail() -> None:
    value_range = QuantisationRange(lower=-1.0, upper=1.0, levels=1 << 20)
    values = np.random.default_rng(4).uniform(-1.0, 1.0, (3, 40_000))  # several chunks
    quantised = quantise(
        values=values, value_range=value_range, bit_width=32, rng=np.random.default_rng(5)
    )
    assert quantised.shape == values.shape
    restored = quantised * value_range.step + value_range.lower
    assert np.abs(restored - values).max() <= value_range.step
    values[2, 39_999] = np.nan  # in the last chunk
    with pytest.raises(ValueError, match="finite"):
        quantise(values=values, value_range=value_range, bit_width=32, rng=np.random.default_rng(5))
    with pytest.raises(ValueError, match="contiguous"):
        quantise(
            values=np.zeros(4),
            value_range=value_range,
            bit_width=32,
            rng=np.random.default_rng(5),
            out=np.zeros(8, dtype=np.uint32)[::2],
        )
