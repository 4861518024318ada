import os
import time

import numpy as np
import pytest

from common.secagg.mask_expansion import expand_mask


@pytest.mark.parametrize("bit_width", [8, 20, 32, 40, 53])
def test_expansion_is_deterministic_in_range_and_seed_dependent(bit_width: int) -> None:
    seed = os.urandom(32)
    first = expand_mask(seed=seed, length=1000, bit_width=bit_width)
    assert np.array_equal(first, expand_mask(seed=seed, length=1000, bit_width=bit_width))
    assert first.dtype == (np.uint32 if bit_width <= 32 else np.uint64)
    assert int(first.max()) < 1 << bit_width
    other = expand_mask(seed=os.urandom(32), length=1000, bit_width=bit_width)
    assert not np.array_equal(first, other)


def test_a_shorter_expansion_is_a_prefix() -> None:
    seed = os.urandom(32)
    long = expand_mask(seed=seed, length=1001, bit_width=32)
    assert np.array_equal(expand_mask(seed=seed, length=7, bit_width=32), long[:7])


def test_masks_look_uniform() -> None:
    mask = expand_mask(seed=os.urandom(32), length=200_000, bit_width=16)
    counts = np.bincount((mask >> 12).astype(np.int64), minlength=16)
    expected = mask.size / 16
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 50  # 15 degrees of freedom: p < 1e-5 beyond this
    assert abs(float(mask.mean()) - (2**16 - 1) / 2) < 200


def test_one_million_entries_expand_fast() -> None:
    seed = os.urandom(32)
    expand_mask(seed=seed, length=1_000_000, bit_width=32)
    best = min(
        _timed(lambda: expand_mask(seed=seed, length=1_000_000, bit_width=32)) for _ in range(5)
    )
    assert best < 0.1


def _timed(function: object) -> float:
    start = time.perf_counter()
    function()  # type: ignore[operator]
    return time.perf_counter() - start


def test_bad_seed_and_width_are_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(seed=b"short", length=3, bit_width=32)
    with pytest.raises(ValueError, match="bit width"):
        expand_mask(seed=bytes(32), length=3, bit_width=64)
