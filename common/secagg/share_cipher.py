"""AES-256-GCM for the Shamir shares that sites send each other through the coordinator.

The coordinator routes the ciphertexts but cannot read or alter them undetected (Bonawitz et
al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017,
section 4, ShareKeys; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020). Sender, receiver, round and session are bound in the associated data,
so a ciphertext replayed from another round or redirected to another site fails
authentication. In active-coordinator mode the associated data also carries the pair binding
(``round_binding``: parameter digest, graph and both channel public keys). A fresh random
96-bit nonce is prefixed to each ciphertext.

The plaintext is a share bundle: the sender's self-mask-seed share followed by its
mask-key share for the receiver (66 bytes each, see ``shamir``).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedmm.common.secagg.key_agreement import PROTOCOL_LABEL
from fedmm.common.secagg.shamir import SHARE_BYTES

NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_BUNDLE_BYTES = 2 * SHARE_BYTES
SEALED_SHARE_BUNDLE_BYTES = NONCE_BYTES + SHARE_BUNDLE_BYTES + TAG_BYTES


class ShareCipherError(ValueError):
    """A sealed share bundle is malformed or fails authentication."""


def associated_data(
    *,
    sender_id: int,
    receiver_id: int,
    round_id: int,
    session_nonce: bytes,
    binding: bytes = b"",
) -> bytes:
    """The AES-GCM associated data: protocol, round, session, sender and receiver (and, in
    active mode, the pair binding)."""
    parts = [
        PROTOCOL_LABEL,
        b"share-bundle",
        f"round={round_id}".encode(),
        b"session=" + session_nonce.hex().encode(),
        f"sender={sender_id}".encode(),
        f"receiver={receiver_id}".encode(),
    ]
    if binding:
        parts.append(b"binding=" + binding.hex().encode())
    return b"|".join(parts)


def seal_share_bundle(
    *,
    key: bytes,
    self_mask_seed_share: bytes,
    mask_key_share: bytes,
    sender_id: int,
    receiver_id: int,
    round_id: int,
    session_nonce: bytes,
    binding: bytes = b"",
) -> bytes:
    """Encrypt one sender's two shares for one receiver: nonce || ciphertext || tag."""
    if len(self_mask_seed_share) != SHARE_BYTES or len(mask_key_share) != SHARE_BYTES:
        raise ShareCipherError(f"shares must be {SHARE_BYTES} bytes each")
    nonce = os.urandom(NONCE_BYTES)
    aad = associated_data(
        sender_id=sender_id,
        receiver_id=receiver_id,
        round_id=round_id,
        session_nonce=session_nonce,
        binding=binding,
    )
    return nonce + AESGCM(key).encrypt(nonce, self_mask_seed_share + mask_key_share, aad)


def open_share_bundle(
    *,
    key: bytes,
    sealed: bytes,
    sender_id: int,
    receiver_id: int,
    round_id: int,
    session_nonce: bytes,
    binding: bytes = b"",
) -> tuple[bytes, bytes]:
    """Decrypt and authenticate a sealed bundle; return (self-mask-seed share, mask-key share)."""
    if len(sealed) != SEALED_SHARE_BUNDLE_BYTES:
        raise ShareCipherError(
            f"sealed bundle must be {SEALED_SHARE_BUNDLE_BYTES} bytes, got {len(sealed)}"
        )
    aad = associated_data(
        sender_id=sender_id,
        receiver_id=receiver_id,
        round_id=round_id,
        session_nonce=session_nonce,
        binding=binding,
    )
    try:
        plaintext = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ShareCipherError("share bundle failed authentication") from None
    return plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:]
