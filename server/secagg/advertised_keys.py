"""The public keys sites advertise for their next round in their unmask replies.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020; Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017) opens every round with a setup exchange in which the sites advertise
two fresh X25519 public keys. A site that unmasks a round here can advertise the fresh keys
of the round the unmask request names (``client.secagg.next_round_keys``); when every site
sampled for that round did, the coordinator skips setup and sends the task together with
the neighbours' keys (``server.secagg.stages.server_use_advertised_keys``).

:func:`collect_advertised_keys` keeps the advertisements of one unmask exchange that are
for the round asked, well formed and, in active-coordinator mode, signed by the roster site
that took part in this round under that node id (``round_signatures``); the rest are
dropped with a reason (the site then joins the next round through setup). Nothing here is
secret.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.key_agreement import PUBLIC_KEY_BYTES
from fedmm.common.secagg.protocol_stages import (
    NEXT_CHANNEL_PUBLIC_KEY,
    NEXT_KEY_SIGNATURE,
    NEXT_MASK_PUBLIC_KEY,
    NEXT_ROUND,
)
from fedmm.common.secagg.roster import SIGNATURE_BYTES, VerifiedRoster
from fedmm.common.secagg.round_config import MAX_ROUND
from fedmm.common.secagg.round_signatures import AdvertisedFor, SignatureError, verify_round_keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdvertisedKeys:
    """One site's public keys for one later round (and, in active mode, its roster name and
    its signature over them)."""

    round_id: int
    channel_public_key: bytes
    mask_public_key: bytes
    site_name: str = ""
    key_signature: bytes = b""

    def setup_payload(self) -> dict[str, Any]:
        """The fields of a setup reply that these keys stand for."""
        payload: dict[str, Any] = {
            "channel_public_key": self.channel_public_key,
            "mask_public_key": self.mask_public_key,
        }
        if self.key_signature:
            payload |= {"site_name": self.site_name, "key_signature": self.key_signature}
        return payload


def collect_advertised_keys(
    *,
    replies: Mapping[int, Mapping[str, Any]],
    next_round: int,
    exchange: str,
    roster: VerifiedRoster | None = None,
    site_names: Mapping[int, str] | None = None,
) -> tuple[dict[int, AdvertisedKeys], list[str]]:
    """The valid advertisements among the unmask ``replies`` for ``next_round`` of
    ``exchange``, and the reasons the others were dropped. ``roster`` (active mode): each
    must be signed by the roster site named ``site_names[site]`` in this round."""
    accepted: dict[int, AdvertisedKeys] = {}
    rejections: list[str] = []
    for site, payload in sorted(replies.items()):
        if NEXT_ROUND not in payload:
            continue
        try:
            round_id = check.require_int(payload, NEXT_ROUND, minimum=0, maximum=MAX_ROUND)
            if round_id != next_round:
                raise check.InvalidPayloadError(f"keys for round {round_id}, not {next_round}")
            channel = check.require_bytes(payload, NEXT_CHANNEL_PUBLIC_KEY, length=PUBLIC_KEY_BYTES)
            mask = check.require_bytes(payload, NEXT_MASK_PUBLIC_KEY, length=PUBLIC_KEY_BYTES)
            if channel == mask:
                raise check.InvalidPayloadError("the two advertised keys are the same")
            keys = AdvertisedKeys(
                round_id=round_id, channel_public_key=channel, mask_public_key=mask
            )
            if roster is not None:
                name = (site_names or {}).get(site)
                if name is None:
                    raise check.InvalidPayloadError("no roster name for this site")
                signature = check.require_bytes(payload, NEXT_KEY_SIGNATURE, length=SIGNATURE_BYTES)
                verify_round_keys(
                    roster,
                    parameters_digest=b"",
                    site_id=site,
                    site_name=name,
                    channel_public_key=channel,
                    mask_public_key=mask,
                    signature=signature,
                    advertised=AdvertisedFor(
                        roster_digest=roster.digest, exchange=exchange, round_id=round_id
                    ),
                )
                keys = AdvertisedKeys(
                    round_id=round_id,
                    channel_public_key=channel,
                    mask_public_key=mask,
                    site_name=name,
                    key_signature=signature,
                )
        except (check.InvalidPayloadError, SignatureError) as error:
            reason = f"site {site}: advertised keys dropped: {error}"
            logger.warning("secagg %s", reason)
            rejections.append(reason)
            continue
        accepted[site] = keys
    return accepted, rejections
