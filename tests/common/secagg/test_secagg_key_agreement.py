import os

import pytest

from fedmm.common.secagg.key_agreement import (
    KeyAgreementError,
    derive_channel_key,
    derive_pairwise_mask_seed,
    generate_private_key,
    load_private_key,
    public_key_for,
)

NONCE = os.urandom(32)


def _pair_seed(
    own: bytes,
    peer_public: bytes,
    *,
    own_id: int,
    peer_id: int,
    round_id: int = 1,
    nonce: bytes = NONCE,
) -> bytes:
    return derive_pairwise_mask_seed(
        own_private_key=own,
        peer_public_key=peer_public,
        round_id=round_id,
        session_nonce=nonce,
        own_id=own_id,
        peer_id=peer_id,
    )


def test_both_sides_derive_the_same_keys() -> None:
    alice, bob = generate_private_key(), generate_private_key()
    assert _pair_seed(alice, public_key_for(bob), own_id=1, peer_id=2) == _pair_seed(
        bob, public_key_for(alice), own_id=2, peer_id=1
    )
    channel_a = derive_channel_key(
        own_private_key=alice,
        peer_public_key=public_key_for(bob),
        round_id=1,
        session_nonce=NONCE,
        own_id=1,
        peer_id=2,
    )
    channel_b = derive_channel_key(
        own_private_key=bob,
        peer_public_key=public_key_for(alice),
        round_id=1,
        session_nonce=NONCE,
        own_id=2,
        peer_id=1,
    )
    assert channel_a == channel_b
    assert len(channel_a) == 32


def test_a_loaded_private_key_derives_what_its_raw_bytes_derive() -> None:
    alice, bob = generate_private_key(), generate_private_key()
    from_loaded = derive_pairwise_mask_seed(
        own_private_key=load_private_key(alice),
        peer_public_key=public_key_for(bob),
        round_id=1,
        session_nonce=NONCE,
        own_id=1,
        peer_id=2,
    )
    assert from_loaded == _pair_seed(alice, public_key_for(bob), own_id=1, peer_id=2)
    with pytest.raises(KeyAgreementError, match="32 bytes"):
        load_private_key(b"short")


def test_keys_are_bound_to_purpose_round_session_and_pair() -> None:
    alice, bob, carol = generate_private_key(), generate_private_key(), generate_private_key()
    base = _pair_seed(alice, public_key_for(bob), own_id=1, peer_id=2)
    channel = derive_channel_key(
        own_private_key=alice,
        peer_public_key=public_key_for(bob),
        round_id=1,
        session_nonce=NONCE,
        own_id=1,
        peer_id=2,
    )
    variants = {
        channel,
        _pair_seed(alice, public_key_for(bob), own_id=1, peer_id=2, round_id=2),
        _pair_seed(alice, public_key_for(bob), own_id=1, peer_id=2, nonce=os.urandom(32)),
        _pair_seed(alice, public_key_for(bob), own_id=1, peer_id=3),
        _pair_seed(alice, public_key_for(carol), own_id=1, peer_id=2),
    }
    assert base not in variants
    assert len(variants) == 5


def test_fresh_key_pairs_differ() -> None:
    assert len({generate_private_key() for _ in range(10)}) == 10


def test_low_order_and_malformed_public_keys_are_rejected() -> None:
    own = generate_private_key()
    with pytest.raises(KeyAgreementError):
        _pair_seed(own, bytes(32), own_id=1, peer_id=2)  # the identity point
    with pytest.raises(KeyAgreementError, match="32 bytes"):
        _pair_seed(own, b"short", own_id=1, peer_id=2)
