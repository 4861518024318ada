"""X25519 key agreement and HKDF-SHA256 derivations, bound to round, purpose and pair.

Every site makes two fresh X25519 key pairs per round: a channel pair, whose agreed secret
keys the AES-GCM channel that carries Shamir shares through the coordinator, and a mask pair,
whose agreed secret seeds the pairwise masks (Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS 2017, section 4: keys (c, s); Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).

A raw Diffie-Hellman output is never used as a key: HKDF-SHA256 turns it into a 32-byte key
whose ``info`` string names the protocol version, the purpose, the round number, the round's
session nonce and the (ordered) pair of site ids, so keys of different purposes, rounds or
pairs are independent. In active-coordinator mode the ``info`` also carries a *binding*
(``round_binding``): a hash of the round's parameter digest, the graph the site derived and
both public keys, so a key agreed under one view of the round is unrelated to any other.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
DERIVED_KEY_BYTES = 32
PROTOCOL_LABEL = b"fedmm/secagg+/v1"

PURPOSE_CHANNEL = "share-channel"
PURPOSE_PAIRWISE_MASK = "pairwise-mask"


class KeyAgreementError(ValueError):
    """A public key is malformed or the agreement produced a degenerate secret."""


def generate_private_key() -> bytes:
    """A fresh X25519 private key, as its 32 raw bytes."""
    return X25519PrivateKey.generate().private_bytes_raw()


def load_private_key(private_key: bytes) -> X25519PrivateKey:
    """The key object of a raw private key: load it once for many agreements (loading costs
    as much as one agreement, since it recomputes the public key)."""
    if len(private_key) != PRIVATE_KEY_BYTES:
        raise KeyAgreementError(f"private key must be {PRIVATE_KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(private_key)


def public_key_for(private_key: bytes) -> bytes:
    """The 32-byte X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def derivation_info(
    *,
    purpose: str,
    round_id: int,
    session_nonce: bytes,
    site_a: int,
    site_b: int,
    binding: bytes = b"",
) -> bytes:
    """The HKDF ``info`` string binding a key to purpose, round, session and site pair (and,
    in active mode, to ``binding``: parameters, graph and both public keys)."""
    low, high = sorted((site_a, site_b))
    parts = [
        PROTOCOL_LABEL,
        purpose.encode(),
        f"round={round_id}".encode(),
        b"session=" + session_nonce.hex().encode(),
        f"pair={low},{high}".encode(),
    ]
    if binding:
        parts.append(b"binding=" + binding.hex().encode())
    return b"|".join(parts)


def agree_and_derive(
    *,
    own_private_key: bytes | X25519PrivateKey,
    peer_public_key: bytes,
    purpose: str,
    round_id: int,
    session_nonce: bytes,
    own_id: int,
    peer_id: int,
    binding: bytes = b"",
) -> bytes:
    """X25519 between the two sites, then HKDF-SHA256 into a 32-byte key for ``purpose``.

    Both sides obtain the same key; a third key pair, another round, session, purpose or
    pair gives an unrelated key. ``own_private_key`` is raw bytes or a loaded key
    (:func:`load_private_key`).
    """
    if len(peer_public_key) != PUBLIC_KEY_BYTES:
        raise KeyAgreementError(f"public key must be {PUBLIC_KEY_BYTES} bytes")
    if not isinstance(own_private_key, X25519PrivateKey):
        own_private_key = load_private_key(own_private_key)
    try:
        shared = own_private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as error:  # low-order peer key: all-zero shared secret
        raise KeyAgreementError(f"key agreement failed: {error}") from None
    return HKDF(
        algorithm=hashes.SHA256(),
        length=DERIVED_KEY_BYTES,
        salt=None,
        info=derivation_info(
            purpose=purpose,
            round_id=round_id,
            session_nonce=session_nonce,
            site_a=own_id,
            site_b=peer_id,
            binding=binding,
        ),
    ).derive(shared)


def derive_channel_key(
    *,
    own_private_key: bytes | X25519PrivateKey,
    peer_public_key: bytes,
    round_id: int,
    session_nonce: bytes,
    own_id: int,
    peer_id: int,
    binding: bytes = b"",
) -> bytes:
    """The AES-256-GCM key of the share channel between two sites in one round."""
    return agree_and_derive(
        own_private_key=own_private_key,
        peer_public_key=peer_public_key,
        purpose=PURPOSE_CHANNEL,
        round_id=round_id,
        session_nonce=session_nonce,
        own_id=own_id,
        peer_id=peer_id,
        binding=binding,
    )


def derive_pairwise_mask_seed(
    *,
    own_private_key: bytes | X25519PrivateKey,
    peer_public_key: bytes,
    round_id: int,
    session_nonce: bytes,
    own_id: int,
    peer_id: int,
    binding: bytes = b"",
) -> bytes:
    """The 32-byte seed of the pairwise mask between two sites in one round."""
    return agree_and_derive(
        own_private_key=own_private_key,
        peer_public_key=peer_public_key,
        purpose=PURPOSE_PAIRWISE_MASK,
        round_id=round_id,
        session_nonce=session_nonce,
        own_id=own_id,
        peer_id=peer_id,
        binding=binding,
    )
