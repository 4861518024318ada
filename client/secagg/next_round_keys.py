"""Fresh key pairs for a site's next round, made while it answers this round's unmask request.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020; Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017) makes two fresh X25519 key pairs per site per round and advertises the
public keys in a setup exchange of their own. Here a site that unmasks round r makes the two
key pairs of the round the request names (r + 1 for training) right then, keeps the private
keys in its node state and puts the public keys in its unmask reply. When every site sampled
for that round advertised keys, the coordinator skips setup: the round's first request
carries the task and the neighbours' advertised keys, and the site shares its secrets right
after the task ran (three exchanges instead of four).

Why this is as secure as setup keys:

- **Fresh, one round each.** The pairs are generated from ``os.urandom`` after round r's
  reveal, so nothing revealed in round r (the mask keys of r's dropouts, the self-mask seeds
  of r's survivors) bears on them. Advertising early only moves when the public keys are
  sent, and public keys are public.
- **Bound to one round.** A site keeps one advertised pair set per exchange (``train``,
  ``evaluate``), tagged with the round it was made for, and takes it out of its state
  (:func:`claim_next_round_keys`) before it uses it: the keys are refused for any other
  round, and a second request for the same round finds none. Every key derived from them
  still names the round and its session nonce (``key_agreement``).
- **Not sampled, or the round falls back.** Keys a site advertised for a round in which it
  does not take part in this way (not sampled, or the coordinator runs setup after all) are
  discarded at the site's next round and never used.
- **A lying coordinator** (active-coordinator mode) cannot substitute or replay them: the
  site signs them with its roster key over the roster digest, the exchange and the round id
  (``round_signatures.advertised_keys_message``), and every participant checks that
  signature as it checks setup-signed keys.

The private keys never leave the node and are never logged (``NextRoundKeys.__repr__``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.client.secagg.site_identity import SiteIdentity
from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.key_agreement import (
    PRIVATE_KEY_BYTES,
    generate_private_key,
    public_key_for,
)
from fedmm.common.secagg.protocol_stages import (
    NEXT_CHANNEL_PUBLIC_KEY,
    NEXT_KEY_SIGNATURE,
    NEXT_MASK_PUBLIC_KEY,
    NEXT_ROUND,
)
from fedmm.common.secagg.round_config import MAX_ROUND, SecAggRoundConfig
from fedmm.common.secagg.round_signatures import advertised_keys_message, sign
from fedmm.common.site_refusal import RefusalCode


@dataclass(frozen=True)
class NextRoundKeys:
    """A site's two fresh private keys for one later round (secrets: node-local only)."""

    round_id: int
    channel_private_key: bytes
    mask_private_key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"NextRoundKeys(round={self.round_id})"

    def to_record(self) -> dict[str, Any]:
        """A ConfigRecord-compatible dict for ``context.state``."""
        return {
            "round": self.round_id,
            "channel_private_key": self.channel_private_key,
            "mask_private_key": self.mask_private_key,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> NextRoundKeys:
        keys = cls(
            round_id=int(record["round"]),
            channel_private_key=bytes(record["channel_private_key"]),
            mask_private_key=bytes(record["mask_private_key"]),
        )
        if {len(keys.channel_private_key), len(keys.mask_private_key)} != {PRIVATE_KEY_BYTES}:
            raise ValueError("stored next-round key has the wrong length")
        return keys


def advertise_next_round_keys(
    *,
    config: SecAggRoundConfig,
    site_id: int,
    request: Mapping[str, Any],
    exchange: str,
    identity: SiteIdentity | None = None,
) -> tuple[NextRoundKeys | None, dict[str, Any]]:
    """The keys for the round the unmask ``request`` names (``next_round``), and the reply
    fields that advertise them; ``(None, {})`` when it names none.

    The round must come after this one (``config``'s). In active mode (``config`` names a
    roster) the public keys are signed with ``identity``'s roster key over the roster
    digest, ``exchange`` and the round.
    """
    if NEXT_ROUND not in request:
        return None, {}
    try:
        next_round = check.require_int(request, NEXT_ROUND, minimum=0, maximum=MAX_ROUND)
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"unmask request rejected: {error}") from None
    if next_round <= config.round_id:
        raise SecAggRefusal(
            f"unmask request asks for keys for round {next_round}, not after this round "
            f"{config.round_id}"
        )
    keys = NextRoundKeys(
        round_id=next_round,
        channel_private_key=generate_private_key(),
        mask_private_key=generate_private_key(),
    )
    channel_public_key = public_key_for(keys.channel_private_key)
    mask_public_key = public_key_for(keys.mask_private_key)
    reply: dict[str, Any] = {
        NEXT_ROUND: next_round,
        NEXT_CHANNEL_PUBLIC_KEY: channel_public_key,
        NEXT_MASK_PUBLIC_KEY: mask_public_key,
    }
    if config.active:
        if identity is None:
            raise SecAggRefusal(
                "active-coordinator round without this site's roster identity",
                code=RefusalCode.SECAGG_POLICY,
            )
        reply[NEXT_KEY_SIGNATURE] = sign(
            identity.signing_key,
            advertised_keys_message(
                roster_digest=config.roster_digest,
                exchange=exchange,
                round_id=next_round,
                site_id=site_id,
                site_name=identity.name,
                channel_public_key=channel_public_key,
                mask_public_key=mask_public_key,
            ),
        )
    return keys, reply


def claim_next_round_keys(stored: NextRoundKeys | None, *, round_id: int) -> NextRoundKeys:
    """The advertised keys for ``round_id``, which the caller has already taken out of its
    state (each pair serves one round, once); a refusal when there are none, or when they
    were made for another round."""
    if stored is None:
        raise SecAggRefusal(
            f"no advertised keys for round {round_id} (never made, already used, or lost)",
            code=RefusalCode.OUT_OF_ORDER,
        )
    if stored.round_id != round_id:
        raise SecAggRefusal(
            f"the advertised keys were made for round {stored.round_id}, not round {round_id}",
            code=RefusalCode.OUT_OF_ORDER,
        )
    return stored
