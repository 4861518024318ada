import os

import numpy as np
import pytest

from fedmm.common.secagg.input_encoding import (
    SumOutOfRangeError,
    decode_aggregate,
    encode_site_input,
)
from fedmm.common.secagg.payload_validation import InvalidPayloadError, require_ring_vector
from fedmm.common.secagg.ring import add_in_place, zeros
from fedmm.common.secagg.round_config import SecAggRoundConfig


def _config(**overrides: object) -> SecAggRoundConfig:
    arguments = dict(
        round_id=4,
        session_nonce=os.urandom(32),
        site_ids=(3, 5, 9, 11),
        bit_width=32,
        update_length=6,
        update_clip=0.5,
        max_weight=1000,
        metric_names=("accuracy", "loss"),
        metric_lower=(0.0, 0.0),
        metric_upper=(1000.0, 50.0),
    )
    arguments.update(overrides)
    return SecAggRoundConfig(**arguments)  # type: ignore[arg-type]


def test_payload_round_trip() -> None:
    config = _config()
    assert SecAggRoundConfig.from_payload(config.to_payload()) == config


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("site_ids", [3, 3, 5], "distinct"),
        ("site_ids", [3], "need 2"),
        ("bit_width", 64, "bit_width"),
        ("session_nonce", b"short", "32 bytes"),
        ("max_weight", 1 << 31, "max weight"),
        ("update_clip", float("inf"), "finite"),
        ("update_length", True, "int"),
        ("metric_lower", [0.0], "one lower"),
    ],
)
def test_malformed_config_payloads_are_rejected(field: str, value: object, reason: str) -> None:
    payload = _config().to_payload() | {field: value}
    with pytest.raises(InvalidPayloadError, match=reason):
        SecAggRoundConfig.from_payload(payload)


def test_encoding_carries_weight_and_metrics_and_decodes_the_weighted_sum() -> None:
    config = _config()
    rng = np.random.default_rng(0)
    inputs = [
        (rng.uniform(-1, 1, 6), int(rng.integers(0, 1000)), {"loss": 3.0, "accuracy": 0.5 * w})
        for w in range(4)
    ]
    total = zeros(config.masked_length, bit_width=32)
    for update, weight, metrics in inputs:
        encoded = encode_site_input(
            config=config, update=update, weight=weight, metrics=metrics, rng=rng
        )
        assert encoded.shape == (6 + 1 + 2,)
        assert int(encoded[6]) == weight
        add_in_place(total, encoded, bit_width=32)
    aggregate = decode_aggregate(config=config, summed=total, num_summed=4)
    expected = sum(weight * np.clip(update, -0.5, 0.5) for update, weight, _ in inputs)
    assert np.abs(aggregate.weighted_update_sum - expected).max() <= aggregate.update_error_bound
    assert aggregate.weight_sum == sum(weight for _, weight, _ in inputs)
    assert abs(aggregate.metric_sums["loss"] - 12.0) <= aggregate.metric_error_bounds["loss"]
    assert abs(aggregate.metric_sums["accuracy"] - 3.0) <= aggregate.metric_error_bounds["accuracy"]


def _encoded_sum(config: SecAggRoundConfig, count: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    total = zeros(config.masked_length, bit_width=config.bit_width)
    for _ in range(count):
        encoded = encode_site_input(
            config=config,
            update=rng.uniform(-1, 1, config.update_length),
            weight=config.max_weight,
            metrics={"loss": 50.0 * config.max_weight, "accuracy": 1000.0},
            rng=rng,
        )
        add_in_place(total, encoded, bit_width=config.bit_width)
    return total


@pytest.mark.parametrize(
    ("entry", "reason"), [(6, "weight sum"), (7, "metric 'accuracy'"), (8, "metric 'loss'")]
)
def test_a_sum_beyond_what_the_summed_sites_can_send_is_refused(entry: int, reason: str) -> None:
    """Three sites at their largest weight and metrics decode; one unit more in the weight
    or a metric entry (an unremoved mask, or a site that encoded out of range) does not."""
    config = _config()
    total = _encoded_sum(config, 3)
    aggregate = decode_aggregate(config=config, summed=total, num_summed=3)
    assert aggregate.weight_sum == 3 * config.max_weight
    beyond = total.copy()
    beyond[entry] += 1
    with pytest.raises(SumOutOfRangeError, match=reason):
        decode_aggregate(config=config, summed=beyond, num_summed=3)
    # The same sum is out of range for fewer summed sites.
    with pytest.raises(SumOutOfRangeError):
        decode_aggregate(config=config, summed=total, num_summed=2)


def test_an_update_entry_beyond_the_summed_sites_is_refused() -> None:
    config = _config()
    total = _encoded_sum(config, 3)
    total[0] = 3 * config.levels + 1
    with pytest.raises(SumOutOfRangeError, match="weighted update"):
        decode_aggregate(config=config, summed=total, num_summed=3)


@pytest.mark.parametrize(
    ("update", "weight", "metrics", "reason"),
    [
        (np.zeros(5), 1, {"loss": 0.0, "accuracy": 0.0}, "entries"),
        (np.zeros(6), 1001, {"loss": 0.0, "accuracy": 0.0}, "weight"),
        (np.zeros(6), 1, {"loss": 0.0}, "metric"),
        (np.full(6, np.nan), 1, {"loss": 0.0, "accuracy": 0.0}, "finite"),
    ],
)
def test_bad_local_inputs_are_rejected(
    update: np.ndarray, weight: int, metrics: dict[str, float], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        encode_site_input(
            config=_config(),
            update=update,
            weight=weight,
            metrics=metrics,
            rng=np.random.default_rng(),
        )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([1, 2, 3], "numpy array"),
        (np.zeros(3, dtype=np.int32), "dtype"),
        (np.zeros((3, 1), dtype=np.uint32), "shape"),
        (np.array([1, 2, 1 << 20], dtype=np.uint32), "outside"),
    ],
)
def test_ring_vectors_are_checked(value: object, reason: str) -> None:
    with pytest.raises(InvalidPayloadError, match=reason):
        require_ring_vector({"v": value}, "v", length=3, dtype=np.dtype(np.uint32), bit_width=20)
