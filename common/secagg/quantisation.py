"""Clipping and unbiased stochastic rounding of real vectors into Z_(2^b), with headroom.

Secure aggregation sums integers modulo 2^b (Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS 2017; Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020), so each site maps its real values to
integers first. A value v is clipped to [lower, upper] and scaled to u = (v - lower) * L /
(upper - lower) in [0, L]; it is then rounded to floor(u) + 1 with probability u - floor(u)
and to floor(u) otherwise, so the rounded value equals u in expectation (unbiased) and
differs from it by less than one step.

Headroom: L = floor((2^b - 1) / n) for at most n summed sites, so a sum of n values in
[0, L] is at most 2^b - 1 and never wraps modulo 2^b.

Error bound: dequantising a sum of m <= n values gives sum(clipped values) with an absolute
error below m * (upper - lower) / L per entry (each rounding error is below one step
(upper - lower) / L). The errors are independent and zero-mean, so the typical error is of
order sqrt(m) steps; :func:`quantisation_error_bound` returns the worst case.

Randomness for rounding: a numpy ``Generator`` seeded from ``os.urandom`` (256 bits). It is
not a mask and hides nothing: rounding noise only needs to be independent of the data, and
the coordinator never sees the rounded vector without masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fedmm.common.secagg.ring import check_bit_width, ring_dtype

#: Relative slack for float64 rounding in the bound (far below one quantisation step).
_FLOAT_SLACK = 2.0**-40
#: Values are quantised in chunks of this many entries (256 kB of float64 temporaries).
CHUNK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class QuantisationRange:
    """Values are clipped to [lower, upper] and mapped onto the integers 0..levels."""

    lower: float
    upper: float
    levels: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.lower) and np.isfinite(self.upper)):
            raise ValueError("quantisation range must be finite")
        if not self.upper > self.lower:
            raise ValueError(f"upper {self.upper} must exceed lower {self.lower}")
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels must be a positive int, got {self.levels!r}")

    @property
    def step(self) -> float:
        """The width of one quantisation step."""
        return (self.upper - self.lower) / self.levels


def levels_with_headroom(*, bit_width: int, max_summands: int) -> int:
    """The largest L such that ``max_summands`` values in [0, L] sum below 2^bit_width."""
    check_bit_width(bit_width)
    if max_summands < 1:
        raise ValueError("max_summands must be at least 1")
    levels = ((1 << bit_width) - 1) // max_summands
    if levels < 1:
        raise ValueError(f"{max_summands} summands do not fit in {bit_width} bits")
    return levels


def new_rounding_generator() -> np.random.Generator:
    """A numpy generator for stochastic rounding, seeded with 256 bits from ``os.urandom``."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))


def quantise(
    *,
    values: np.ndarray,
    value_range: QuantisationRange,
    bit_width: int,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Clip ``values`` to the range and round them stochastically into 0..levels (ring dtype).

    With ``out`` (a contiguous vector of the ring dtype and the values' shape) the result is
    written there and ``out`` is returned; otherwise a new vector is returned. Non-finite
    values raise ``ValueError`` (``out`` may then hold part of the result).
    """
    check_bit_width(bit_width)
    if value_range.levels >= 1 << bit_width:
        raise ValueError("levels do not fit in the ring")
    real = np.asarray(values, dtype=np.float64)
    dtype = ring_dtype(bit_width)
    if out is None:
        out = np.empty(real.shape, dtype=dtype)
    elif out.dtype != dtype or out.shape != real.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {dtype} array of shape {real.shape}")
    flat_values, flat_out = real.reshape(-1), out.reshape(-1)
    # Chunk by chunk, so that the temporaries stay in the CPU cache.
    for start in range(0, flat_values.size, CHUNK_ELEMENTS):
        stop = start + CHUNK_ELEMENTS
        _quantise_chunk(flat_values[start:stop], value_range, rng, flat_out[start:stop])
    return out


def _quantise_chunk(
    values: np.ndarray, value_range: QuantisationRange, rng: np.random.Generator, out: np.ndarray
) -> None:
    if not np.isfinite(values).all():
        raise ValueError("values must be finite")
    scaled = np.clip(values, value_range.lower, value_range.upper)
    scaled -= value_range.lower
    scaled *= value_range.levels / (value_range.upper - value_range.lower)
    floor = np.floor(scaled)
    scaled -= floor  # now the fractional part
    draws = rng.random(values.shape)
    np.less(draws, scaled, out=draws)  # 1.0 with probability equal to the fractional part
    floor += draws
    np.minimum(floor, value_range.levels, out=floor)
    np.copyto(out, floor, casting="unsafe")  # integers in [0, levels]: exact


def dequantise_sum(
    *, quantised_sum: np.ndarray, value_range: QuantisationRange, num_summed: int
) -> np.ndarray:
    """The real-valued sum of ``num_summed`` quantised vectors from their integer sum."""
    if num_summed < 1:
        raise ValueError("num_summed must be at least 1")
    real = np.asarray(quantised_sum).astype(np.float64)
    real *= value_range.step
    real += num_summed * value_range.lower
    return real


def quantisation_error_bound(*, value_range: QuantisationRange, num_summed: int) -> float:
    """Worst-case absolute error per entry of a dequantised sum of ``num_summed`` vectors.

    The bound is num_summed * (upper - lower) / levels, relative to the sum of the *clipped*
    values, plus a float64 slack far below one step.
    """
    if num_summed < 1:
        raise ValueError("num_summed must be at least 1")
    span = value_range.upper - value_range.lower
    magnitude = num_summed * max(abs(value_range.lower), abs(value_range.upper))
    return num_summed * value_range.step + _FLOAT_SLACK * (magnitude + num_summed * span)
