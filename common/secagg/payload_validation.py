"""Checks on inbound secure-aggregation payloads.

Payloads are plain dicts of the types a Flower ConfigRecord or ArrayRecord carries (int,
float, str, bytes, bool, single-type lists, numpy unsigned arrays). Every stage of both sides
(Bonawitz et al., CCS 2017; Bell et al., CCS 2020) checks what it receives here, and a
malformed payload raises :class:`InvalidPayloadError` with a reason that names the field and
never contains secret values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class InvalidPayloadError(ValueError):
    """An inbound payload is malformed, out of range, out of order or hostile."""


def require_field(payload: Mapping[str, Any], name: str) -> Any:
    """The value of ``name``; raise if the payload is not a mapping or lacks the field."""
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError(f"payload must be a mapping, got {type(payload).__name__}")
    if name not in payload:
        raise InvalidPayloadError(f"missing field {name!r}")
    return payload[name]


def require_int(payload: Mapping[str, Any], name: str, *, minimum: int, maximum: int) -> int:
    """An int field (not bool) within [minimum, maximum]."""
    value = require_field(payload, name)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidPayloadError(f"field {name!r} must be an int, got {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise InvalidPayloadError(f"field {name!r}={value} outside [{minimum}, {maximum}]")
    return value


def require_float(payload: Mapping[str, Any], name: str) -> float:
    """A finite float (or int) field."""
    value = require_field(payload, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidPayloadError(f"field {name!r} must be a number, got {type(value).__name__}")
    if not np.isfinite(value):
        raise InvalidPayloadError(f"field {name!r} must be finite")
    return float(value)


def require_str(payload: Mapping[str, Any], name: str, *, expected: str | None = None) -> str:
    """A str field, optionally equal to ``expected``."""
    value = require_field(payload, name)
    if not isinstance(value, str):
        raise InvalidPayloadError(f"field {name!r} must be a str, got {type(value).__name__}")
    if expected is not None and value != expected:
        raise InvalidPayloadError(f"field {name!r} is {value[:40]!r}, expected {expected!r}")
    return value


def require_bytes(payload: Mapping[str, Any], name: str, *, length: int) -> bytes:
    """A bytes field of exactly ``length`` bytes."""
    value = require_field(payload, name)
    if not isinstance(value, bytes):
        raise InvalidPayloadError(f"field {name!r} must be bytes, got {type(value).__name__}")
    if len(value) != length:
        raise InvalidPayloadError(f"field {name!r} must be {length} bytes, got {len(value)}")
    return value


def require_list(
    payload: Mapping[str, Any], name: str, *, item_type: type, max_length: int
) -> list[Any]:
    """A list whose items are all ``item_type`` (bool is not an int here)."""
    value = require_field(payload, name)
    if not isinstance(value, list | tuple):
        raise InvalidPayloadError(f"field {name!r} must be a list, got {type(value).__name__}")
    if len(value) > max_length:
        raise InvalidPayloadError(f"field {name!r} has {len(value)} items, at most {max_length}")
    for item in value:
        if isinstance(item, bool) and item_type is not bool:
            raise InvalidPayloadError(f"field {name!r} must hold {item_type.__name__} items")
        if not isinstance(item, item_type):
            raise InvalidPayloadError(f"field {name!r} must hold {item_type.__name__} items")
    return list(value)


def require_distinct_ids(ids: list[int], *, name: str) -> None:
    """Raise if a site id appears twice (a duplicated or replayed entry)."""
    if len(set(ids)) != len(ids):
        raise InvalidPayloadError(f"field {name!r} repeats a site id")


def require_ring_vector(
    payload: Mapping[str, Any], name: str, *, length: int, dtype: np.dtype, bit_width: int
) -> np.ndarray:
    """A 1-D numpy array of ``dtype`` and ``length`` with every entry below 2^bit_width."""
    value = require_field(payload, name)
    if not isinstance(value, np.ndarray):
        raise InvalidPayloadError(
            f"field {name!r} must be a numpy array, got {type(value).__name__}"
        )
    if value.dtype != dtype:
        raise InvalidPayloadError(f"field {name!r} has dtype {value.dtype}, expected {dtype}")
    if value.shape != (length,):
        raise InvalidPayloadError(f"field {name!r} has shape {value.shape}, expected ({length},)")
    if bit_width < 8 * dtype.itemsize and length and int(value.max()) >> bit_width:
        raise InvalidPayloadError(f"field {name!r} has entries outside Z_(2^{bit_width})")
    return value
