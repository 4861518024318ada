import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedmm.common.secagg.mask_expansion import add_masks_in_place, expand_mask


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


def test_expansion_is_the_aes256_ctr_keystream_of_the_seed() -> None:
    seed = os.urandom(32)
    length = 70_001  # more than one chunk, not a multiple of it
    keystream = (
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * length))
    )
    expected = np.frombuffer(keystream, dtype="<u4").astype(np.uint32)
    assert np.array_equal(expand_mask(seed=seed, length=length, bit_width=32), expected)
    assert np.array_equal(expand_mask(seed=seed, length=length, bit_width=20), expected & 0xFFFFF)


@pytest.mark.parametrize("bit_width", [16, 32, 40])
@pytest.mark.parametrize("length", [1, 65_536, 200_003])
def test_adding_many_masks_at_once_equals_adding_each_expansion(
    bit_width: int, length: int
) -> None:
    modulus = 1 << bit_width
    plus, minus = [os.urandom(32) for _ in range(3)], [os.urandom(32) for _ in range(2)]
    start = expand_mask(seed=os.urandom(32), length=length, bit_width=bit_width)
    expected = start.astype(object)
    for seed in plus:
        expected = (expected + expand_mask(seed=seed, length=length, bit_width=bit_width)) % modulus
    for seed in minus:
        expected = (expected - expand_mask(seed=seed, length=length, bit_width=bit_width)) % modulus
    accumulator = start.copy()
    add_masks_in_place(accumulator, add_seeds=plus, subtract_seeds=minus, bit_width=bit_width)
    assert np.array_equal(accumulator.astype(object), expected)
    # The same seeds added and subtracted cancel exactly.
    add_masks_in_place(accumulator, add_seeds=minus, subtract_seeds=plus, bit_width=bit_width)
    assert np.array_equal(accumulator, start)


def test_mask_accumulation_rejects_bad_accumulators_and_seeds() -> None:
    with pytest.raises(ValueError, match="uint32"):
        add_masks_in_place(np.zeros(4, np.uint64), add_seeds=[bytes(32)], bit_width=32)
    with pytest.raises(ValueError, match="contiguous"):
        add_masks_in_place(np.zeros(8, np.uint32)[::2], add_seeds=[bytes(32)], bit_width=32)
    with pytest.raises(ValueError, match="32 bytes"):
        add_masks_in_place(np.zeros(4, np.uint32), subtract_seeds=[b"short"], bit_width=32)


def test_bad_seed_and_width_are_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(seed=b"short", length=3, bit_width=32)
    with pytest.raises(ValueError, match="bit width"):
        expand_mask(seed=bytes(32), length=3, bit_width=64)
