"""Shamir t-out-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Each site shares its self-mask seed and its mask private key among its neighbours so that the
coordinator can rebuild exactly one of the two when the site survives or drops out
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, section 4; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, section 3). Any ``threshold`` shares determine the secret; fewer reveal
nothing about it (information-theoretic).

The field is GF(p) with the Mersenne prime p = 2^521 - 1, larger than any 32-byte secret, so a
secret is embedded as an integer without reduction. Coefficients come from ``secrets``
(the operating system's CSPRNG). Shares are encoded as 66-byte big-endian integers.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

FIELD_PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Shares cannot be made or combined (too few, inconsistent, malformed)."""


def split_secret(*, secret: bytes, threshold: int, share_xs: Sequence[int]) -> dict[int, bytes]:
    """Split ``secret`` into shares at the points ``share_xs`` (distinct, in [1, p - 1]).

    Returns a mapping from x-coordinate to the 66-byte share. Any ``threshold`` of them
    reconstruct the secret with :func:`reconstruct_secret`.
    """
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(share_xs)
    if len(set(xs)) != len(xs):
        raise ShamirError("share x-coordinates must be distinct")
    if any(not 0 < x < FIELD_PRIME for x in xs):
        raise ShamirError("share x-coordinates must be in [1, p - 1]")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def reconstruct_secret(*, shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Rebuild the 32-byte secret from at least ``threshold`` shares.

    With more than ``threshold`` shares, the extra ones are checked against the polynomial
    interpolated from the first ``threshold``; any disagreement raises ``ShamirError``.
    """
    if threshold < 1:
        raise ShamirError("threshold must be at least 1")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(shares)}")
    points = sorted((x, _decode_share(y)) for x, y in shares.items())
    if any(not 0 < x < FIELD_PRIME for x, _ in points):
        raise ShamirError("share x-coordinates must be in [1, p - 1]")
    basis, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise ShamirError("shares are inconsistent")
    value = _interpolate(basis, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("reconstructed value is not a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def _decode_share(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise ShamirError(f"share must be {SHARE_BYTES} bytes, got {len(share)}")
    value = int.from_bytes(share, "big")
    if value >= FIELD_PRIME:
        raise ShamirError("share is not a field element")
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % FIELD_PRIME
    return result


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """Lagrange interpolation through ``points``, evaluated at ``at``."""
    total = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - x_j) % FIELD_PRIME
                denominator = denominator * (x_i - x_j) % FIELD_PRIME
        total = (total + y_i * numerator * pow(denominator, -1, FIELD_PRIME)) % FIELD_PRIME
    return total
