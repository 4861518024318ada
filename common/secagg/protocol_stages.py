"""Names of the message exchanges of one round, and the round/stage tag on payloads.

Setup (advertise keys), share keys, masked input and unmask are the rounds 0, 1, 2 and 4 of
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, as used by SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020). Their round 3, the consistency check (sites sign the
survivor set they were told of; section 6), runs between masked input and unmask in
active-coordinator mode only: it matters only against a coordinator that lies. Every payload
in either direction carries ``round`` and ``stage`` so a stale or replayed message from
another round or stage is rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.round_config import MAX_ROUND

STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share_keys"
STAGE_MASKED_INPUT = "masked_input"
STAGE_CONSISTENCY = "consistency"
STAGE_UNMASK = "unmask"
#: The exchanges of a round in the honest-but-curious mode.
STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT, STAGE_UNMASK)
#: The exchanges of a round in active-coordinator mode: one more, the consistency check.
ACTIVE_STAGES = (
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_MASKED_INPUT,
    STAGE_CONSISTENCY,
    STAGE_UNMASK,
)

#: Unmask request: the later round a site is asked to advertise fresh keys for; unmask
#: reply: those public keys and, in active-coordinator mode, the site's signature over them
#: (``round_signatures.advertised_keys_message``).
NEXT_ROUND = "next_round"
NEXT_CHANNEL_PUBLIC_KEY = "next_channel_public_key"
NEXT_MASK_PUBLIC_KEY = "next_mask_public_key"
NEXT_KEY_SIGNATURE = "next_key_signature"


def tag(*, round_id: int, stage: str) -> dict[str, Any]:
    """The round/stage fields that start every payload."""
    return {"round": round_id, "stage": stage}


def require_tag(payload: Mapping[str, Any], *, round_id: int, stage: str) -> None:
    """Raise ``InvalidPayloadError`` unless the payload belongs to this round and stage."""
    check.require_str(payload, "stage", expected=stage)
    received = check.require_int(payload, "round", minimum=0, maximum=MAX_ROUND)
    if received != round_id:
        raise check.InvalidPayloadError(f"payload is for round {received}, expected {round_id}")
