"""Vectors in the ring Z_(2^b) used by secure aggregation.

Masked inputs, masks and their sums live in Z_(2^b) (Bonawitz et al., CCS 2017, section 4;
Bell et al., CCS 2020). Elements are stored in the smallest numpy unsigned type that holds
b bits (uint32 for b <= 32, uint64 above), which Flower's ArrayRecord carries exactly.
"""

from __future__ import annotations

import numpy as np

MIN_BIT_WIDTH = 8
#: Quantisation levels up to 2^b must be exact in float64 (53-bit mantissa).
MAX_BIT_WIDTH = 53


def check_bit_width(bit_width: int) -> None:
    """Raise ``ValueError`` unless ``bit_width`` is a supported ring size."""
    if isinstance(bit_width, bool) or not isinstance(bit_width, int):
        raise ValueError(f"bit width must be an int, got {type(bit_width).__name__}")
    if not MIN_BIT_WIDTH <= bit_width <= MAX_BIT_WIDTH:
        raise ValueError(
            f"bit width must be in [{MIN_BIT_WIDTH}, {MAX_BIT_WIDTH}], got {bit_width}"
        )


def ring_dtype(bit_width: int) -> np.dtype:
    """The numpy dtype that stores elements of Z_(2^bit_width)."""
    check_bit_width(bit_width)
    return np.dtype(np.uint32) if bit_width <= 32 else np.dtype(np.uint64)


def ring_modulus(bit_width: int) -> int:
    """2^bit_width."""
    check_bit_width(bit_width)
    return 1 << bit_width


def reduce_in_place(vector: np.ndarray, *, bit_width: int) -> np.ndarray:
    """Reduce ``vector`` modulo 2^bit_width in place (a no-op when the dtype wraps exactly)."""
    if bit_width not in (32, 64):
        np.bitwise_and(vector, vector.dtype.type((1 << bit_width) - 1), out=vector)
    return vector


def add_in_place(accumulator: np.ndarray, addend: np.ndarray, *, bit_width: int) -> None:
    """``accumulator += addend`` in Z_(2^bit_width); both must have the ring dtype."""
    np.add(accumulator, addend, out=accumulator)
    reduce_in_place(accumulator, bit_width=bit_width)


def subtract_in_place(accumulator: np.ndarray, subtrahend: np.ndarray, *, bit_width: int) -> None:
    """``accumulator -= subtrahend`` in Z_(2^bit_width); both must have the ring dtype."""
    np.subtract(accumulator, subtrahend, out=accumulator)
    reduce_in_place(accumulator, bit_width=bit_width)


def zeros(length: int, *, bit_width: int) -> np.ndarray:
    """The zero vector of Z_(2^bit_width)^length."""
    return np.zeros(length, dtype=ring_dtype(bit_width))
