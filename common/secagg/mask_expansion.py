"""Expand a 32-byte seed into a uniform mask vector in Z_(2^b) with AES-256-CTR.

Masks are the one-time pads of secure aggregation (Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017: PRG(b_u) and PRG(s_uv); Bell
et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020). The PRG
is the AES-256-CTR keystream under the seed as key with an all-zero initial counter block:
every seed keys exactly one expansion (pairwise seeds come from HKDF with round- and
pair-bound ``info``; self-mask seeds are fresh random values), so no (key, counter) pair is
reused. Numpy's generators are never used for masks.

Each element takes 4 keystream bytes (b <= 32) or 8 (b > 32), read little-endian and
reduced modulo 2^b; since 2^b divides 2^32 (or 2^64) the result is exactly uniform.

A site adds its self mask and k signed pairwise masks, and the coordinator removes up to n
masks, each as long as the model. :func:`add_masks_in_place` does that in one pass over the
accumulator: it walks it in cache-sized chunks and, per chunk, adds (or subtracts) the next
keystream chunk of every seed, so no full-length mask is ever allocated. The result is the
same as adding the :func:`expand_mask` vectors one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedmm.common.secagg.ring import check_bit_width, reduce_in_place, ring_dtype

SEED_BYTES = 32
_BLOCK_BYTES = 16
_ZERO_COUNTER = bytes(_BLOCK_BYTES)
#: Elements per chunk: 256 kB of uint32 (512 kB of uint64) stay in the CPU cache.
_CHUNK_ELEMENTS = 1 << 16
_ZERO_CHUNK = bytes(_CHUNK_ELEMENTS * 8)


def expand_mask(*, seed: bytes, length: int, bit_width: int) -> np.ndarray:
    """The mask vector of ``length`` elements of Z_(2^bit_width) determined by ``seed``."""
    if length < 0:
        raise ValueError("length must be non-negative")
    mask = np.zeros(length, dtype=ring_dtype(bit_width))
    add_masks_in_place(mask, add_seeds=[seed], bit_width=bit_width)
    return mask


def add_masks_in_place(
    accumulator: np.ndarray,
    *,
    add_seeds: Sequence[bytes] = (),
    subtract_seeds: Sequence[bytes] = (),
    bit_width: int,
) -> None:
    """``accumulator += sum PRG(add_seeds) - sum PRG(subtract_seeds)`` in Z_(2^bit_width).

    ``accumulator`` is a one-dimensional, contiguous vector of the ring dtype; each PRG
    output has its length. Equal to adding and subtracting :func:`expand_mask` vectors.
    """
    check_bit_width(bit_width)
    dtype = ring_dtype(bit_width)
    if accumulator.dtype != dtype or accumulator.ndim != 1:
        raise ValueError(f"accumulator must be a one-dimensional {dtype} vector")
    if not accumulator.flags.c_contiguous or not accumulator.flags.writeable:
        raise ValueError("accumulator must be contiguous and writeable")
    if any(len(seed) != SEED_BYTES for seed in (*add_seeds, *subtract_seeds)):
        raise ValueError(f"seeds must be {SEED_BYTES} bytes")
    streams = [
        (Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor(), operation)
        for seeds, operation in ((add_seeds, np.add), (subtract_seeds, np.subtract))
        for seed in seeds
    ]
    if not streams:
        return
    itemsize = dtype.itemsize
    # update_into needs room for one extra block minus one byte.
    keystream = bytearray(_CHUNK_ELEMENTS * itemsize + _BLOCK_BYTES - 1)
    chunk_mask = np.frombuffer(keystream, dtype=dtype.newbyteorder("<"), count=_CHUNK_ELEMENTS)
    length = accumulator.shape[0]
    for start in range(0, length, _CHUNK_ELEMENTS):
        count = min(_CHUNK_ELEMENTS, length - start)
        target = accumulator[start : start + count]
        zeros = memoryview(_ZERO_CHUNK)[: count * itemsize]
        for encryptor, operation in streams:
            if encryptor.update_into(zeros, keystream) != count * itemsize:
                raise RuntimeError("keystream shorter than requested")  # pragma: no cover
            operation(target, chunk_mask[:count], out=target)
    # Sums mod 2^32 (2^64) reduce exactly mod 2^b, since 2^b divides the dtype's modulus.
    reduce_in_place(accumulator, bit_width=bit_width)
