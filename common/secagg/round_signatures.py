"""Ed25519 signatures on a round's keys and on its survivor set, verified against the roster.

Active-coordinator mode (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, section 6; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, malicious-server variant) adds two signed statements,
each under the site's long-term roster signing key (``roster``):

- **round keys** (setup): "I, site *name*, node *id*, use these two X25519 public keys in the
  round whose parameters hash to *digest*". The parameter digest
  (``SecAggRoundConfig.digest``) covers the round id, the session nonce, the sampled sites,
  the roster digest and every other public parameter, so a key signed for one round, session,
  roster or parameter set is refused in any other: a coordinator can neither substitute keys
  (it cannot sign as a site) nor replay a site's keys from an earlier round.
- **advertised round keys** (unmask of the round before): "I, site *name*, node *id*, will
  use these two X25519 public keys in the *exchange* (train or evaluate) round *r* of the
  federation whose roster hashes to *digest*". A site makes these keys while it answers the
  unmask request of an earlier round, before round r's parameters exist, so the statement
  names the round id instead of the parameter digest; its label differs from the setup
  statement's, so neither can stand for the other. The round's parameters and graph still
  bind every key derived from them (``round_binding``).
- **survivor set** (consistency check): "in the round with parameter digest *p* and graph
  digest *g*, the survivors are exactly *U3*". An honest site signs one set per round and
  unmasks only when enough sites signed the same set (``active_parameters``).

Messages are domain-separated by a label and the statement's kind; names are restricted to
``roster.SITE_NAME_PATTERN``, so the ``|``-joined encoding is unambiguous. No secret is ever
part of a message or of an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.common.secagg.key_agreement import PROTOCOL_LABEL
from fedmm.common.secagg.roster import SIGNATURE_BYTES, RosterError, VerifiedRoster


class SignatureError(ValueError):
    """A signed statement does not verify, or its signer is not in the roster."""


def round_keys_message(
    *,
    parameters_digest: bytes,
    site_id: int,
    site_name: str,
    channel_public_key: bytes,
    mask_public_key: bytes,
) -> bytes:
    """What a site signs in setup: its two round public keys bound to the round's parameters
    (round, session, roster, sites, ...), its node id and its roster name."""
    return b"|".join(
        [
            PROTOCOL_LABEL,
            b"round-keys",
            b"parameters=" + parameters_digest.hex().encode(),
            f"site={site_id}".encode(),
            b"name=" + site_name.encode(),
            b"channel=" + channel_public_key.hex().encode(),
            b"mask=" + mask_public_key.hex().encode(),
        ]
    )


def advertised_keys_message(
    *,
    roster_digest: bytes,
    exchange: str,
    round_id: int,
    site_id: int,
    site_name: str,
    channel_public_key: bytes,
    mask_public_key: bytes,
) -> bytes:
    """What a site signs when it advertises its keys for a later round: the two public keys
    bound to the roster, the kind of exchange (``train`` or ``evaluate``), the round id they
    serve, its node id and its roster name."""
    return b"|".join(
        [
            PROTOCOL_LABEL,
            b"advertised-round-keys",
            b"roster=" + roster_digest.hex().encode(),
            b"exchange=" + exchange.encode(),
            f"round={round_id}".encode(),
            f"site={site_id}".encode(),
            b"name=" + site_name.encode(),
            b"channel=" + channel_public_key.hex().encode(),
            b"mask=" + mask_public_key.hex().encode(),
        ]
    )


def survivor_set_message(
    *, parameters_digest: bytes, graph_digest: bytes, survivor_ids: Iterable[int]
) -> bytes:
    """What a site signs in the consistency check: the exact survivor set of this round."""
    survivors = hashlib.sha256(
        ",".join(str(site) for site in sorted(survivor_ids)).encode()
    ).hexdigest()
    return b"|".join(
        [
            PROTOCOL_LABEL,
            b"survivor-set",
            b"parameters=" + parameters_digest.hex().encode(),
            b"graph=" + graph_digest.hex().encode(),
            b"survivors=" + survivors.encode(),
        ]
    )


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """An Ed25519 signature (64 bytes)."""
    return private_key.sign(message)


def verify_signed_by(
    roster: VerifiedRoster, *, site_name: str, message: bytes, signature: bytes
) -> None:
    """Raise ``SignatureError`` unless ``site_name`` is in the roster and signed ``message``."""
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"signature of {site_name!r} must be {SIGNATURE_BYTES} bytes")
    try:
        public_key = roster.public_key(site_name)
    except RosterError:
        raise SignatureError(f"site {site_name!r} is not in the roster") from None
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        raise SignatureError(f"the signature of site {site_name!r} does not verify") from None


def verify_round_keys(
    roster: VerifiedRoster,
    *,
    parameters_digest: bytes,
    site_id: int,
    site_name: str,
    channel_public_key: bytes,
    mask_public_key: bytes,
    signature: bytes,
    advertised: AdvertisedFor | None = None,
) -> None:
    """Raise ``SignatureError`` unless the roster site ``site_name`` signed these keys for
    this node id and these round parameters (``advertised``: for this exchange and round,
    in the unmask reply of an earlier round)."""
    if advertised is None:
        message = round_keys_message(
            parameters_digest=parameters_digest,
            site_id=site_id,
            site_name=site_name,
            channel_public_key=channel_public_key,
            mask_public_key=mask_public_key,
        )
    else:
        message = advertised_keys_message(
            roster_digest=advertised.roster_digest,
            exchange=advertised.exchange,
            round_id=advertised.round_id,
            site_id=site_id,
            site_name=site_name,
            channel_public_key=channel_public_key,
            mask_public_key=mask_public_key,
        )
    verify_signed_by(roster, site_name=site_name, message=message, signature=signature)


@dataclass(frozen=True)
class AdvertisedFor:
    """The round that keys advertised in an earlier round's unmask reply are signed for."""

    roster_digest: bytes
    exchange: str
    round_id: int


def count_survivor_set_signatures(
    roster: VerifiedRoster,
    *,
    parameters_digest: bytes,
    graph_digest: bytes,
    survivor_ids: Sequence[int],
    names: Mapping[int, str],
    signer_ids: Sequence[int],
    signatures: Sequence[bytes],
) -> int:
    """How many distinct survivors signed exactly ``survivor_ids``. A signer that is not a
    survivor, appears twice, has no roster name or whose signature fails is not counted."""
    survivors = set(survivor_ids)
    message = survivor_set_message(
        parameters_digest=parameters_digest,
        graph_digest=graph_digest,
        survivor_ids=survivor_ids,
    )
    counted: set[int] = set()
    counted_names: set[str] = set()
    for signer, signature in zip(signer_ids, signatures, strict=True):
        name = names.get(signer)
        if signer in counted or signer not in survivors or name is None or name in counted_names:
            continue
        try:
            verify_signed_by(roster, site_name=name, message=message, signature=signature)
        except SignatureError:
            continue
        counted.add(signer)
        counted_names.add(name)
    return len(counted)
