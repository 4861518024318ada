"""The vector a site masks: its weighted update, its weight and its metrics, all quantised.

FedAvg needs sum_i w_i x_i and sum_i w_i. Sending the weight w_i (the example count) or the
metrics in the clear would reveal them per site, so they travel inside the masked vector
(an extension of Bonawitz et al., CCS 2017, and Bell et al., CCS 2020, which sum a single
vector). Layout of the encoded vector in Z_(2^b):

    [ w * clip(x, -c, c)  (update_length entries) | w (1 entry) | metrics (one entry each) ]

Each segment is quantised with its own range (see ``round_config``): the weighted update in
[-c W, c W] and each metric in its declared [lower, upper], both with L = floor((2^b - 1)/n)
levels; the weight exactly, as an integer in [0, W]. Metrics are summed as given: a site that
wants a weighted mean sends w * metric and the coordinator divides by the summed weight.

For m summed sites the per-entry errors are below m * 2 c W / L (update), m * (upper -
lower) / L (metric) and zero (weight), relative to the clipped values.

Range check on decoding: m honest encodings sum to at most m * L in every quantised entry and
to at most m * W in the weight entry. A larger entry means that a mask was not removed or
that a site encoded a value outside its range (the masks make that invisible until the sum is
unmasked); :func:`decode_aggregate` then raises :class:`SumOutOfRangeError` instead of
returning a corrupt weight or metric.

Integer updates (``config.integer_update``, distributed DP): the site hands an integer vector
already reduced into Z_(2^b) (its integer gradient sum plus its Skellam share, see
``common.distributed_dp``); it is summed exactly and the sum is read back centred, in
[-2^(b-1), 2^(b-1)). The weight and metrics are encoded as above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmm.common.secagg.quantisation import (
    CHUNK_ELEMENTS,
    dequantise_sum,
    quantisation_error_bound,
    quantise,
)
from fedmm.common.secagg.round_config import SecAggRoundConfig


class SumOutOfRangeError(ValueError):
    """The unmasked sum has an entry no ``num_summed`` honest encodings can reach."""


@dataclass(frozen=True)
class DecodedAggregate:
    """The dequantised sum over the summed sites."""

    weighted_update_sum: np.ndarray
    weight_sum: int
    metric_sums: dict[str, float]
    num_summed: int
    update_error_bound: float
    metric_error_bounds: dict[str, float]


def encode_site_input(
    *,
    config: SecAggRoundConfig,
    update: np.ndarray,
    weight: int,
    metrics: Mapping[str, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Quantise (weight * clipped update, weight, metrics) into one vector of the ring."""
    vector = np.asarray(update, dtype=np.float64).reshape(-1)
    if vector.shape != (config.update_length,):
        raise ValueError(f"update has {vector.size} entries, expected {config.update_length}")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise ValueError("weight must be an int")
    if not 0 <= weight <= config.max_weight:
        raise ValueError(f"weight must be in [0, {config.max_weight}]")
    if set(metrics) != set(config.metric_names):
        raise ValueError("metrics must match the round's metric names exactly")
    encoded = np.empty(config.masked_length, dtype=config.dtype)
    if config.integer_update:  # distributed DP: the site's integer vector, summed as is
        encoded[: config.update_length] = _ring_integers(vector, bit_width=config.bit_width)
    else:  # chunk by chunk: the temporaries stay in the CPU cache
        for start in range(0, config.update_length, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, config.update_length)
            weighted = np.clip(vector[start:stop], -config.update_clip, config.update_clip)
            weighted *= int(weight)
            quantise(
                values=weighted,
                value_range=config.update_range,
                bit_width=config.bit_width,
                rng=rng,
                out=encoded[start:stop],
            )
    encoded[config.update_length] = int(weight)
    for index, name in enumerate(config.metric_names):
        encoded[config.update_length + 1 + index] = quantise(
            values=np.array([float(metrics[name])]),
            value_range=config.metric_range(index),
            bit_width=config.bit_width,
            rng=rng,
        )[0]
    return encoded


def decode_aggregate(
    *, config: SecAggRoundConfig, summed: np.ndarray, num_summed: int
) -> DecodedAggregate:
    """Dequantise the unmasked sum of ``num_summed`` encoded vectors; raise
    :class:`SumOutOfRangeError` when an entry is out of its range (module doc)."""
    if summed.shape != (config.masked_length,):
        raise ValueError("summed vector has the wrong length")
    check_sum_in_range(config=config, summed=summed, num_summed=num_summed)
    if config.integer_update:
        update_sum = centred_integers(summed[: config.update_length], bit_width=config.bit_width)
    else:
        update_sum = dequantise_sum(
            quantised_sum=summed[: config.update_length],
            value_range=config.update_range,
            num_summed=num_summed,
        )
    metric_sums = {
        name: float(
            dequantise_sum(
                quantised_sum=summed[
                    config.update_length + 1 + index : config.update_length + 2 + index
                ],
                value_range=config.metric_range(index),
                num_summed=num_summed,
            )[0]
        )
        for index, name in enumerate(config.metric_names)
    }
    return DecodedAggregate(
        weighted_update_sum=update_sum,
        weight_sum=int(summed[config.update_length]),
        metric_sums=metric_sums,
        num_summed=num_summed,
        update_error_bound=0.0
        if config.integer_update
        else quantisation_error_bound(value_range=config.update_range, num_summed=num_summed),
        metric_error_bounds={
            name: quantisation_error_bound(
                value_range=config.metric_range(index), num_summed=num_summed
            )
            for index, name in enumerate(config.metric_names)
        },
    )


def check_sum_in_range(*, config: SecAggRoundConfig, summed: np.ndarray, num_summed: int) -> None:
    """Raise :class:`SumOutOfRangeError` unless the weight entry is in [0, m W] and every
    quantised entry (update unless it is an integer update, metrics) in [0, m L], m =
    ``num_summed``. The message names the segment, never a value."""
    if num_summed < 1:
        raise SumOutOfRangeError("a sum needs at least one summed site")
    length = config.update_length
    top = num_summed * config.levels
    if not config.integer_update and length and int(summed[:length].max()) > top:
        raise SumOutOfRangeError(
            f"the weighted update sum exceeds what {num_summed} sites can send"
        )
    if int(summed[length]) > num_summed * config.max_weight:
        raise SumOutOfRangeError(
            f"the weight sum exceeds {num_summed} sites x max weight {config.max_weight}"
        )
    for index, name in enumerate(config.metric_names):
        if int(summed[length + 1 + index]) > top:
            raise SumOutOfRangeError(
                f"the sum of metric {name!r} exceeds what {num_summed} sites can send"
            )


def _ring_integers(vector: np.ndarray, *, bit_width: int) -> np.ndarray:
    """An integer update already reduced into Z_(2^b): integral values in [0, 2^b)."""
    if not (np.all(vector >= 0) and np.all(vector < 2.0**bit_width)):
        raise ValueError(f"integer update entries must lie in [0, 2^{bit_width})")
    if not np.array_equal(vector, np.floor(vector)):
        raise ValueError("integer update entries must be integers")
    return vector.astype(np.uint64)


def centred_integers(summed: np.ndarray, *, bit_width: int) -> np.ndarray:
    """Sums in Z_(2^b) read as integers in [-2^(b-1), 2^(b-1)) (float64, exact for b <= 53)."""
    values = np.asarray(summed).astype(np.int64)
    half = 1 << (bit_width - 1)
    values[values >= half] -= 1 << bit_width
    return values.astype(np.float64)
