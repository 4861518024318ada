"""A site's keys for its next round: made at unmask, bound to one round, used once."""

from __future__ import annotations

import pytest

from fedmm.client.secagg.next_round_keys import (
    NextRoundKeys,
    advertise_next_round_keys,
    claim_next_round_keys,
)
from fedmm.client.secagg.stages import SecAggRefusal, client_setup
from fedmm.common.secagg.key_agreement import generate_private_key, public_key_for
from fedmm.common.secagg.round_config import SecAggRoundConfig
from fedmm.server.secagg.stages import server_start_round

SITES = [11, 22, 33, 44]


def _setup_request(round_id: int) -> dict:
    _, requests = server_start_round(
        round_id=round_id, site_ids=SITES, update_length=8, update_clip=1.0, max_weight=100
    )
    return requests[11]


def _keys(round_id: int) -> NextRoundKeys:
    return NextRoundKeys(
        round_id=round_id,
        channel_private_key=generate_private_key(),
        mask_private_key=generate_private_key(),
    )


def test_setup_uses_the_advertised_keys_of_its_round() -> None:
    keys = _keys(3)
    state, reply = client_setup(site_id=11, request=_setup_request(3), advertised_keys=keys)
    assert state.channel_private_key == keys.channel_private_key
    assert state.mask_private_key == keys.mask_private_key
    assert reply["mask_public_key"] == public_key_for(keys.mask_private_key)


@pytest.mark.parametrize("request_round", [2, 4, 9])
def test_keys_advertised_for_one_round_are_refused_in_any_other(request_round: int) -> None:
    with pytest.raises(SecAggRefusal, match="made for round 3"):
        client_setup(site_id=11, request=_setup_request(request_round), advertised_keys=_keys(3))


def test_keys_serve_once_a_second_claim_finds_none() -> None:
    """The caller takes the keys out of its state before it claims them: a second request
    for the same round (say, another session of it after a refusal) finds no keys."""
    stored: dict[str, NextRoundKeys | None] = {"keys": _keys(5)}
    first = claim_next_round_keys(stored.pop("keys", None), round_id=5)
    assert first.round_id == 5
    with pytest.raises(SecAggRefusal, match="no advertised keys"):
        claim_next_round_keys(stored.pop("keys", None), round_id=5)


def _config(round_id: int) -> SecAggRoundConfig:
    return SecAggRoundConfig.from_payload(_setup_request(round_id))


def test_unmask_advertises_fresh_public_keys_for_a_later_round_only() -> None:
    config = _config(3)
    keys, reply = advertise_next_round_keys(
        config=config, site_id=11, request={"next_round": 4}, exchange="train"
    )
    assert keys is not None and keys.round_id == 4
    assert reply == {
        "next_round": 4,
        "next_channel_public_key": public_key_for(keys.channel_private_key),
        "next_mask_public_key": public_key_for(keys.mask_private_key),
    }
    again, _ = advertise_next_round_keys(
        config=config, site_id=11, request={"next_round": 4}, exchange="train"
    )
    assert again is not None and again.mask_private_key != keys.mask_private_key  # fresh
    assert advertise_next_round_keys(config=config, site_id=11, request={}, exchange="train") == (
        None,
        {},
    )
    for earlier in (3, 2):
        with pytest.raises(SecAggRefusal, match="not after this round"):
            advertise_next_round_keys(
                config=config, site_id=11, request={"next_round": earlier}, exchange="train"
            )


def test_stored_keys_round_trip_and_hide_their_secrets() -> None:
    keys = _keys(7)
    assert NextRoundKeys.from_record(keys.to_record()) == keys
    assert keys.mask_private_key.hex() not in repr(keys)
    broken = keys.to_record() | {"mask_private_key": b"short"}
    with pytest.raises(ValueError, match="wrong length"):
        NextRoundKeys.from_record(broken)
