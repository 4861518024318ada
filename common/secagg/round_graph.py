"""The neighbour graph of one round, fixed after setup over the sites that advertised keys.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020) draws the graph over all n clients before the protocol starts. Here the
coordinator fixes it only once the setup stage is over: over U1, the sites whose public keys
it accepted, with degree k and threshold t chosen for |U1|, and sends it in the share-keys
request. Departure from the paper, and why: sites refuse or drop out at setup for reasons
that have nothing to do with the protocol (a spent privacy budget, a failed training run), and
a graph drawn over all sampled sites then leaves the survivors with fewer neighbours, and a
threshold sized for n, than the analysis assumed. Drawing it over U1 keeps every participant's
degree at k, and lets every site check (k, t) against its own policy for the actual number of
participants (``client.secagg.policy``). The graph is still a random Harary graph seeded by
the round's session nonce (``neighbour_graph``); with k = |U1| - 1 it is the complete graph of
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017.

In active-coordinator mode the ring is seeded instead by a hash of the participants' signed
round keys (``graph_seed``), which the coordinator cannot name; k and t then follow from the
round's signed parameters (``active_parameters``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.key_agreement import PROTOCOL_LABEL
from fedmm.common.secagg.neighbour_graph import neighbour_graph
from fedmm.common.secagg.round_config import MAX_SITES, SecAggRoundConfig


@dataclass(frozen=True)
class RoundGraph:
    """U1 (sorted), the degree k and threshold t fixed for |U1|, and the graph they give.

    ``seed`` (active mode): the ring seed from the signed round keys (``graph_seed``); empty
    means the session nonce seeds the ring (honest-but-curious mode).
    """

    participant_ids: tuple[int, ...]
    degree: int
    threshold: int
    session_nonce: bytes
    seed: bytes = b""

    def __post_init__(self) -> None:
        if list(self.participant_ids) != sorted(set(self.participant_ids)):
            raise ValueError("participant ids must be distinct and sorted")
        if len(self.participant_ids) < 2:
            raise ValueError("a neighbour graph needs at least two participants")
        if not 1 <= self.degree <= self.num_participants - 1:
            raise ValueError(f"degree {self.degree} must be in [1, {self.num_participants - 1}]")
        if not 2 <= self.threshold <= self.degree + 1:
            raise ValueError(f"threshold {self.threshold} must be in [2, degree + 1]")
        # The graph must be buildable (an odd degree needs an even number of participants).
        _ = self.neighbours

    @property
    def num_participants(self) -> int:
        return len(self.participant_ids)

    @property
    def complete(self) -> bool:
        return self.degree == self.num_participants - 1

    @property
    def ring_seed(self) -> bytes:
        return self.seed or self.session_nonce

    @cached_property
    def neighbours(self) -> dict[int, frozenset[int]]:
        """Every participant's neighbours, derived from the ring seed."""
        return neighbour_graph(
            site_ids=self.participant_ids, degree=self.degree, seed=self.ring_seed
        )

    def digest(self) -> bytes:
        """SHA-256 of the ring seed, the participants, k and t: the graph as one site sees
        it, bound into every key and signature of the round's later stages in active mode."""
        ids = ",".join(str(site) for site in self.participant_ids).encode()
        return hashlib.sha256(
            PROTOCOL_LABEL
            + b"|graph|"
            + self.ring_seed
            + f"|k={self.degree}|t={self.threshold}|".encode()
            + ids
        ).digest()

    def to_payload(self) -> dict[str, Any]:
        """The fields the share-keys request carries (ConfigRecord-compatible)."""
        return {
            "participant_ids": list(self.participant_ids),
            "degree": self.degree,
            "threshold": self.threshold,
        }

    @classmethod
    def from_payload(
        cls, payload: Mapping[str, Any], *, config: SecAggRoundConfig, seed: bytes = b""
    ) -> RoundGraph:
        """Parse the graph of a share-keys request; raise ``InvalidPayloadError`` unless the
        participants are sampled sites of ``config`` and k, t make a valid graph."""
        participants = check.require_list(
            payload, "participant_ids", item_type=int, max_length=MAX_SITES
        )
        degree = check.require_int(payload, "degree", minimum=1, maximum=MAX_SITES)
        threshold = check.require_int(payload, "threshold", minimum=2, maximum=MAX_SITES)
        strangers = set(participants) - set(config.site_ids)
        if strangers:
            raise check.InvalidPayloadError(
                f"participant_ids names {len(strangers)} sites that were not sampled"
            )
        try:
            return cls(
                participant_ids=tuple(participants),
                degree=degree,
                threshold=threshold,
                session_nonce=config.session_nonce,
                seed=seed,
            )
        except ValueError as error:
            raise check.InvalidPayloadError(f"invalid neighbour graph: {error}") from None
