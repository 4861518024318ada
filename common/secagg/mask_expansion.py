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
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.secagg.ring import reduce_in_place, ring_dtype

SEED_BYTES = 32
_BLOCK_BYTES = 16
_ZERO_COUNTER = bytes(_BLOCK_BYTES)


def expand_mask(*, seed: bytes, length: int, bit_width: int) -> np.ndarray:
    """The mask vector of ``length`` elements of Z_(2^bit_width) determined by ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise ValueError("length must be non-negative")
    dtype = ring_dtype(bit_width).newbyteorder("<")
    byte_length = length * dtype.itemsize
    # update_into needs room for one extra block minus one byte.
    output = bytearray(byte_length + _BLOCK_BYTES - 1)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()
    written = encryptor.update_into(bytes(byte_length), output)
    if written != byte_length:  # pragma: no cover - CTR is a stream mode
        raise RuntimeError("keystream shorter than requested")
    mask = np.frombuffer(output, dtype=dtype, count=length).astype(
        ring_dtype(bit_width), copy=False
    )
    return reduce_in_place(mask, bit_width=bit_width)
