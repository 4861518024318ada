"""The public parameters of one secure-aggregation round, chosen by the coordinator.

The coordinator fixes, per round, the sampled sites, a fresh 32-byte session nonce (it also
seeds the neighbour graph and is bound into every derived key and ciphertext), the ring size
2^b, and the clipping ranges of the encoded input (see ``input_encoding``). It is sent to every
site in the setup stage as a plain payload; each site validates it before taking part.

The neighbour graph's degree k and Shamir threshold t (Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020; k = n - 1 is Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017) are not
part of it: they are fixed after setup, for the sites that finished it (``round_graph``).

Active-coordinator mode (Bonawitz et al. section 6; ``active_parameters``) adds the digest of
the federation's roster, the corrupt sites c the round assumes, the dropouts d it allows
after setup and the degree and threshold overrides; with them, k and t follow from |U1|
alone, so :meth:`SecAggRoundConfig.digest`, which every site signs its round keys under,
binds the sites, degree, threshold, ring and ranges of the round.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.active_parameters import ActiveGraphParameters, active_graph_parameters
from fedmm.common.secagg.quantisation import QuantisationRange, levels_with_headroom
from fedmm.common.secagg.ring import MAX_BIT_WIDTH, MIN_BIT_WIDTH, check_bit_width, ring_dtype

SESSION_NONCE_BYTES = 32
MAX_SITE_ID = (1 << 64) - 1
MAX_SITES = 10_000
MAX_UPDATE_LENGTH = 1 << 30
MAX_METRICS = 64
MAX_ROUND = (1 << 63) - 1
ROSTER_DIGEST_BYTES = 32


@dataclass(frozen=True)
class SecAggRoundConfig:
    """Everything public about one round; identical at every site and the coordinator."""

    round_id: int
    session_nonce: bytes
    site_ids: tuple[int, ...]
    bit_width: int
    update_length: int
    update_clip: float
    max_weight: int
    metric_names: tuple[str, ...] = ()
    metric_lower: tuple[float, ...] = ()
    metric_upper: tuple[float, ...] = ()
    #: Distributed DP (``common.distributed_dp``): the update segment is the site's own integer
    #: vector in Z_(2^b), summed as is (no clipping, no quantisation) and centred on decoding.
    integer_update: bool = False
    #: Active-coordinator mode: the SHA-256 digest of the roster every site signed (empty:
    #: the honest-but-curious mode), the corrupt sites c assumed over the roster, the sites d
    #: that may drop out after setup, and the degree and threshold overrides (0: derived).
    roster_digest: bytes = b""
    corrupt_sites: int = 0
    dropout_sites: int = 0
    graph_degree: int = 0
    graph_threshold: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.round_id <= MAX_ROUND:
            raise ValueError("round id out of range")
        if len(self.session_nonce) != SESSION_NONCE_BYTES:
            raise ValueError(f"session nonce must be {SESSION_NONCE_BYTES} bytes")
        if list(self.site_ids) != sorted(set(self.site_ids)):
            raise ValueError("site ids must be distinct and sorted")
        if not 2 <= len(self.site_ids) <= MAX_SITES:
            raise ValueError(f"need 2 to {MAX_SITES} sites, got {len(self.site_ids)}")
        if any(not 0 <= site <= MAX_SITE_ID for site in self.site_ids):
            raise ValueError("site ids must be unsigned 64-bit integers")
        check_bit_width(self.bit_width)
        if not 1 <= self.update_length <= MAX_UPDATE_LENGTH:
            raise ValueError("update length out of range")
        if not (np.isfinite(self.update_clip) and self.update_clip > 0):
            raise ValueError("update clip must be positive and finite")
        if not 1 <= self.max_weight <= self.levels:
            raise ValueError(
                f"max weight must be in [1, {self.levels}] so {self.num_sites} weights cannot wrap"
            )
        if len(self.metric_names) > MAX_METRICS or len(set(self.metric_names)) != len(
            self.metric_names
        ):
            raise ValueError(f"metric names must be distinct and at most {MAX_METRICS}")
        if not len(self.metric_names) == len(self.metric_lower) == len(self.metric_upper):
            raise ValueError("one lower and one upper bound per metric")
        for low, high in zip(self.metric_lower, self.metric_upper, strict=True):
            QuantisationRange(lower=low, upper=high, levels=1)
        if self.roster_digest and len(self.roster_digest) != ROSTER_DIGEST_BYTES:
            raise ValueError(f"roster digest must be {ROSTER_DIGEST_BYTES} bytes")
        active_counts = (
            self.corrupt_sites,
            self.dropout_sites,
            self.graph_degree,
            self.graph_threshold,
        )
        if any(not 0 <= value <= MAX_SITES for value in active_counts):
            raise ValueError(f"corrupt, dropout, degree and threshold must be in [0, {MAX_SITES}]")
        if not self.roster_digest and any(active_counts):
            raise ValueError("corrupt, dropout, degree and threshold need the active mode")

    @property
    def active(self) -> bool:
        """Whether the round runs in active-coordinator mode (signed keys, roster)."""
        return bool(self.roster_digest)

    def active_graph(self, num_participants: int) -> ActiveGraphParameters:
        """Active mode: the graph and thresholds the round's signed parameters give for
        ``num_participants`` sites (what the coordinator and every site derive alike)."""
        return active_graph_parameters(
            num_participants,
            corrupt=self.corrupt_sites,
            dropouts=self.dropout_sites,
            degree=self.graph_degree,
            threshold=self.graph_threshold,
        )

    def digest(self) -> bytes:
        """SHA-256 of every public parameter of the round (round id and session included):
        what each site signs its round keys under in active mode."""
        return self._digest

    @cached_property
    def _digest(self) -> bytes:
        payload = self.to_payload()
        payload["session_nonce"] = self.session_nonce.hex()
        if self.active:
            payload["roster_digest"] = self.roster_digest.hex()
        encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"fedmm/secagg+/v1|round-parameters|" + encoded).digest()

    @property
    def num_sites(self) -> int:
        return len(self.site_ids)

    @property
    def levels(self) -> int:
        """Quantisation levels per site, with headroom for the sum over all sites."""
        return levels_with_headroom(bit_width=self.bit_width, max_summands=self.num_sites)

    @property
    def masked_length(self) -> int:
        """Entries of the masked vector: update, then weight, then metrics."""
        return self.update_length + 1 + len(self.metric_names)

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bit_width)

    @property
    def update_range(self) -> QuantisationRange:
        """Range of weight * clipped update: [-clip * max_weight, clip * max_weight]."""
        bound = self.update_clip * self.max_weight
        return QuantisationRange(lower=-bound, upper=bound, levels=self.levels)

    @property
    def weight_range(self) -> QuantisationRange:
        """Weights are integers in [0, max_weight], encoded exactly (one level per unit)."""
        return QuantisationRange(lower=0.0, upper=float(self.max_weight), levels=self.max_weight)

    def metric_range(self, index: int) -> QuantisationRange:
        return QuantisationRange(
            lower=self.metric_lower[index], upper=self.metric_upper[index], levels=self.levels
        )

    def share_x(self, site_id: int) -> int:
        """The Shamir x-coordinate of a site's shares: its 1-based position in ``site_ids``."""
        return self.site_ids.index(site_id) + 1

    def to_payload(self) -> dict[str, Any]:
        """The config as a ConfigRecord-compatible dict."""
        return (
            {
                "round": self.round_id,
                "session_nonce": self.session_nonce,
                "site_ids": list(self.site_ids),
                "bit_width": self.bit_width,
                "update_length": self.update_length,
                "update_clip": float(self.update_clip),
                "max_weight": self.max_weight,
                "metric_names": list(self.metric_names),
                "metric_lower": [float(value) for value in self.metric_lower],
                "metric_upper": [float(value) for value in self.metric_upper],
            }
            | ({"integer_update": True} if self.integer_update else {})
            | self._active_payload()
        )

    def _active_payload(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {
            "roster_digest": self.roster_digest,
            "corrupt_sites": self.corrupt_sites,
            "dropout_sites": self.dropout_sites,
            "graph_degree": self.graph_degree,
            "graph_threshold": self.graph_threshold,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SecAggRoundConfig:
        """Parse and validate a config payload; raise ``InvalidPayloadError`` if malformed."""
        try:
            return cls(
                round_id=check.require_int(payload, "round", minimum=0, maximum=MAX_ROUND),
                session_nonce=check.require_bytes(
                    payload, "session_nonce", length=SESSION_NONCE_BYTES
                ),
                site_ids=tuple(
                    check.require_list(payload, "site_ids", item_type=int, max_length=MAX_SITES)
                ),
                bit_width=check.require_int(
                    payload, "bit_width", minimum=MIN_BIT_WIDTH, maximum=MAX_BIT_WIDTH
                ),
                update_length=check.require_int(
                    payload, "update_length", minimum=1, maximum=MAX_UPDATE_LENGTH
                ),
                update_clip=check.require_float(payload, "update_clip"),
                max_weight=check.require_int(payload, "max_weight", minimum=1, maximum=1 << 53),
                metric_names=tuple(
                    check.require_list(
                        payload, "metric_names", item_type=str, max_length=MAX_METRICS
                    )
                ),
                metric_lower=tuple(
                    float(value)
                    for value in check.require_list(
                        payload, "metric_lower", item_type=float, max_length=MAX_METRICS
                    )
                ),
                metric_upper=tuple(
                    float(value)
                    for value in check.require_list(
                        payload, "metric_upper", item_type=float, max_length=MAX_METRICS
                    )
                ),
                integer_update=_optional_bool(payload, "integer_update"),
                **_active_fields(payload),
            )
        except check.InvalidPayloadError:
            raise
        except ValueError as error:
            raise check.InvalidPayloadError(f"invalid round config: {error}") from None


def _active_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    if "roster_digest" not in payload:
        return {}
    fields = {
        "roster_digest": check.require_bytes(payload, "roster_digest", length=ROSTER_DIGEST_BYTES)
    }
    for name in ("corrupt_sites", "dropout_sites", "graph_degree", "graph_threshold"):
        fields[name] = check.require_int(payload, name, minimum=0, maximum=MAX_SITES)
    return fields


def _optional_bool(payload: Mapping[str, Any], key: str) -> bool:
    value = payload.get(key, False)
    if not isinstance(value, bool):
        raise check.InvalidPayloadError(f"{key} must be a bool")
    return value
