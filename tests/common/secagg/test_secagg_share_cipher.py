import os

import pytest

from fedmm.common.secagg.shamir import SHARE_BYTES
from fedmm.common.secagg.share_cipher import ShareCipherError, open_share_bundle, seal_share_bundle

KEY = os.urandom(32)
NONCE = os.urandom(32)
SEED_SHARE = os.urandom(SHARE_BYTES)
KEY_SHARE = os.urandom(SHARE_BYTES)


def _seal(**overrides: object) -> bytes:
    arguments = dict(
        key=KEY,
        self_mask_seed_share=SEED_SHARE,
        mask_key_share=KEY_SHARE,
        sender_id=1,
        receiver_id=2,
        round_id=7,
        session_nonce=NONCE,
    )
    arguments.update(overrides)
    return seal_share_bundle(**arguments)  # type: ignore[arg-type]


def _open(sealed: bytes, **overrides: object) -> tuple[bytes, bytes]:
    arguments = dict(
        key=KEY, sealed=sealed, sender_id=1, receiver_id=2, round_id=7, session_nonce=NONCE
    )
    arguments.update(overrides)
    return open_share_bundle(**arguments)  # type: ignore[arg-type]


def test_round_trip() -> None:
    assert _open(_seal()) == (SEED_SHARE, KEY_SHARE)


def test_ciphertext_hides_the_shares_and_uses_fresh_nonces() -> None:
    first, second = _seal(), _seal()
    assert first != second
    assert SEED_SHARE not in first and KEY_SHARE not in first


@pytest.mark.parametrize(
    "overrides",
    [
        {"sender_id": 3},
        {"receiver_id": 3},
        {"round_id": 8},
        {"session_nonce": os.urandom(32)},
        {"key": os.urandom(32)},
    ],
)
def test_wrong_binding_fails_authentication(overrides: dict[str, object]) -> None:
    with pytest.raises(ShareCipherError, match="authentication"):
        _open(_seal(), **overrides)


def test_tampered_ciphertext_fails_authentication() -> None:
    sealed = bytearray(_seal())
    sealed[20] ^= 1
    with pytest.raises(ShareCipherError, match="authentication"):
        _open(bytes(sealed))


def test_wrong_length_is_rejected() -> None:
    with pytest.raises(ShareCipherError, match="bytes"):
        _open(_seal()[:-1])
