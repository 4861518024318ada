import itertools
import os

import pytest

from fedmm.common.secagg.shamir import (
    FIELD_PRIME,
    SHARE_BYTES,
    ShamirError,
    reconstruct_secret,
    split_secret,
)


def test_any_threshold_subset_reconstructs_the_secret() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret=secret, threshold=3, share_xs=[1, 2, 5, 9, 11])
    for subset in itertools.combinations(shares, 3):
        assert reconstruct_secret(shares={x: shares[x] for x in subset}, threshold=3) == secret


def test_all_shares_reconstruct_and_are_checked_for_consistency() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret=secret, threshold=4, share_xs=range(1, 11))
    assert reconstruct_secret(shares=shares, threshold=4) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = split_secret(secret=os.urandom(32), threshold=3, share_xs=[1, 2, 3])
    with pytest.raises(ShamirError, match="need 3 shares"):
        reconstruct_secret(shares={1: shares[1], 2: shares[2]}, threshold=3)


def test_fewer_than_threshold_shares_do_not_determine_the_secret() -> None:
    # Interpolating t - 1 shares as if the threshold were t - 1 gives an unrelated value.
    secret = os.urandom(32)
    shares = split_secret(secret=secret, threshold=3, share_xs=[1, 2, 3])
    try:
        guess = reconstruct_secret(shares={1: shares[1], 2: shares[2]}, threshold=2)
    except ShamirError:  # the value exceeded 32 bytes, as it almost always does
        guess = None
    assert guess != secret


def test_shares_of_the_same_secret_differ_between_splits() -> None:
    secret = os.urandom(32)
    first = split_secret(secret=secret, threshold=2, share_xs=[1, 2])
    second = split_secret(secret=secret, threshold=2, share_xs=[1, 2])
    assert first[1] != second[1]


def test_a_tampered_share_is_detected_when_extra_shares_exist() -> None:
    shares = split_secret(secret=os.urandom(32), threshold=2, share_xs=[1, 2, 3])
    tampered = dict(shares)
    value = int.from_bytes(tampered[3], "big") ^ 1
    tampered[3] = value.to_bytes(SHARE_BYTES, "big")
    with pytest.raises(ShamirError, match="inconsistent"):
        reconstruct_secret(shares=tampered, threshold=2)


@pytest.mark.parametrize(
    ("secret", "threshold", "xs", "reason"),
    [
        (b"short", 2, [1, 2], "32 bytes"),
        (bytes(32), 2, [1, 1], "distinct"),
        (bytes(32), 2, [0, 1], r"\[1, p - 1\]"),
        (bytes(32), 3, [1, 2], "threshold"),
    ],
)
def test_split_rejects_bad_arguments(
    secret: bytes, threshold: int, xs: list[int], reason: str
) -> None:
    with pytest.raises(ShamirError, match=reason):
        split_secret(secret=secret, threshold=threshold, share_xs=xs)


def test_reconstruct_rejects_malformed_shares() -> None:
    with pytest.raises(ShamirError, match="66 bytes"):
        reconstruct_secret(shares={1: b"x", 2: b"y"}, threshold=2)
    not_in_field = FIELD_PRIME.to_bytes(SHARE_BYTES, "big")
    with pytest.raises(ShamirError, match="field element"):
        reconstruct_secret(shares={1: not_in_field, 2: not_in_field}, threshold=2)
