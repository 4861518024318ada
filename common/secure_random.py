"""Randomness for differential privacy from a cryptographically secure source.

Every random draw a DP guarantee rests on (DP-SGD's Gaussian noise and Poisson batches, the
noisy record count, Skellam noise shares, Poisson samples of distributed DP) comes from here,
never from torch's or numpy's Mersenne Twister and never from a seed the coordinator knows.

- Bytes: ``os.urandom``, or an AES-256-CTR keystream (``cryptography``) keyed by 32 bytes of
  ``os.urandom`` (:func:`fresh_random_bytes`): a CSPRNG as long as the key stays secret, and
  much cheaper per byte than a system call. A fixed key makes statistical tests reproducible
  through the same code path.
- Uniforms: u = (2m + 1) / 2^53 with m a 52-bit integer, so u and 1 - u are both exact in
  float64 and u is never 0 or 1.
- Normal deviates: the Box-Muller transform (G. E. P. Box and M. E. Muller, "A Note on the
  Generation of Random Normal Deviates", Ann. Math. Statist. 29(2), 1958): two independent
  uniforms u1, u2 give two independent standard normals sqrt(-2 ln u1) cos(2 pi u2) and
  sqrt(-2 ln u1) sin(2 pi u2), computed in float64. With u1 >= 2^-53 the largest deviate is
  sqrt(106 ln 2) = 8.57, so the tail beyond 8.57 standard deviations (probability below
  1e-17 per coordinate) is never drawn. Like every floating-point sampler this is not
  protected against floating-point attacks on the noise (Mironov, CCS 2012).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: A source of uniform random bytes: ``random_bytes(n)`` returns n bytes.
RandomBytes = Callable[[int], bytes]

_MANTISSA_BITS = 52
_SCALE = 2.0 ** (_MANTISSA_BITS + 1)


def aes_ctr_random_bytes(key: bytes) -> RandomBytes:
    """An AES-256-CTR keystream under ``key`` (32 bytes), read in order.

    With a key from ``os.urandom`` this is a CSPRNG; with a fixed key it makes statistical
    tests reproducible through the same code path.
    """
    if len(key) != 32:
        raise ValueError("AES-256 key must be 32 bytes")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def random_bytes(count: int) -> bytes:
        return encryptor.update(bytes(count))

    return random_bytes


def fresh_random_bytes() -> RandomBytes:
    """A new AES-256-CTR keystream keyed by 32 bytes of ``os.urandom``."""
    return aes_ctr_random_bytes(os.urandom(32))


def secure_uniforms(
    count: int, random_bytes: RandomBytes = os.urandom
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uniforms u in (0, 1) and their exact complements 1 - u (float64)."""
    raw = np.frombuffer(random_bytes(8 * count), dtype="<u8") >> np.uint64(64 - _MANTISSA_BITS)
    odd = 2 * raw + 1  # odd integers below 2^53: exact in float64, never 0 or 2^53
    lower = odd.astype(np.float64) / _SCALE
    upper = (np.uint64(1 << (_MANTISSA_BITS + 1)) - odd).astype(np.float64) / _SCALE
    return lower, upper


def standard_normals(count: int, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """``count`` independent standard normal deviates (float64), Box-Muller on secure
    uniforms (module docstring)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    pairs = (count + 1) // 2
    uniforms, _ = secure_uniforms(2 * pairs, random_bytes)
    radius = np.sqrt(-2.0 * np.log(uniforms[:pairs]))
    angle = 2.0 * np.pi * uniforms[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def bernoulli_indices(
    count: int, probability: float, random_bytes: RandomBytes = os.urandom
) -> np.ndarray:
    """Indices i < ``count`` with u_i < ``probability``: each independently with that
    probability (Poisson sampling of records)."""
    if not 0 <= probability <= 1:
        raise ValueError("probability must be in [0, 1]")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    uniforms, _ = secure_uniforms(count, random_bytes)
    return np.flatnonzero(uniforms < probability)
