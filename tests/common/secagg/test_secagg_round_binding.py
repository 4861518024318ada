"""Active mode binds keys, bundles and the graph to the round's signed parameters and keys;
the honest-but-curious mode derives exactly what it derived before."""

from __future__ import annotations

import dataclasses
import os

import pytest

from fedmm.common.secagg.graph_seed import graph_seed
from fedmm.common.secagg.key_agreement import (
    derivation_info,
    derive_channel_key,
    generate_private_key,
    public_key_for,
)
from fedmm.common.secagg.round_binding import pair_binding, session_digest
from fedmm.common.secagg.round_config import SecAggRoundConfig
from fedmm.common.secagg.share_cipher import ShareCipherError, open_share_bundle, seal_share_bundle

NONCE = bytes(range(32))


def _config(**changes: object) -> SecAggRoundConfig:
    base = SecAggRoundConfig(
        round_id=3,
        session_nonce=NONCE,
        site_ids=(1, 2, 3),
        bit_width=32,
        update_length=4,
        update_clip=1.0,
        max_weight=10,
        roster_digest=b"r" * 32,
        corrupt_sites=1,
        dropout_sites=1,
    )
    return dataclasses.replace(base, **changes)


def test_without_a_binding_the_derivation_is_unchanged() -> None:
    info = derivation_info(
        purpose="share-channel", round_id=3, session_nonce=NONCE, site_a=2, site_b=1
    )
    assert info == b"fedmm/secagg+/v1|share-channel|round=3|session=" + NONCE.hex().encode() + (
        b"|pair=1,2"
    )


def test_the_pair_binding_is_the_same_from_both_sides_and_changes_with_every_input() -> None:
    session = session_digest(parameters_digest=b"p" * 32, graph_digest=b"g" * 32)
    one = pair_binding(
        session=session, purpose="x", site_a=1, public_key_a=b"a" * 32, site_b=2, public_key_b=b"b"
    )
    assert one == pair_binding(
        session=session, purpose="x", site_a=2, public_key_a=b"b", site_b=1, public_key_b=b"a" * 32
    )
    other_graph = session_digest(parameters_digest=b"p" * 32, graph_digest=b"h" * 32)
    variants = [
        dict(session=other_graph),
        dict(purpose="y"),
        dict(public_key_a=b"c" * 32),
        dict(site_b=3),
    ]
    base = dict(
        session=session, purpose="x", site_a=1, public_key_a=b"a" * 32, site_b=2, public_key_b=b"b"
    )
    for change in variants:
        assert pair_binding(**(base | change)) != one  # type: ignore[arg-type]


def test_a_bundle_sealed_under_one_view_of_the_round_opens_under_no_other() -> None:
    own, peer = generate_private_key(), generate_private_key()
    bindings = [b"", os.urandom(32), os.urandom(32)]
    for sealed_with in bindings:
        key = derive_channel_key(
            own_private_key=own,
            peer_public_key=public_key_for(peer),
            round_id=3,
            session_nonce=NONCE,
            own_id=1,
            peer_id=2,
            binding=sealed_with,
        )
        sealed = seal_share_bundle(
            key=key,
            self_mask_seed_share=b"\x00" * 66,
            mask_key_share=b"\x01" * 66,
            sender_id=1,
            receiver_id=2,
            round_id=3,
            session_nonce=NONCE,
            binding=sealed_with,
        )
        for opened_with in bindings:
            peer_key = derive_channel_key(
                own_private_key=peer,
                peer_public_key=public_key_for(own),
                round_id=3,
                session_nonce=NONCE,
                own_id=2,
                peer_id=1,
                binding=opened_with,
            )
            arguments = dict(
                key=peer_key,
                sealed=sealed,
                sender_id=1,
                receiver_id=2,
                round_id=3,
                session_nonce=NONCE,
                binding=opened_with,
            )
            if opened_with == sealed_with:
                assert open_share_bundle(**arguments)[1] == b"\x01" * 66  # type: ignore[arg-type]
            else:
                with pytest.raises(ShareCipherError):
                    open_share_bundle(**arguments)  # type: ignore[arg-type]


def test_the_parameter_digest_covers_every_public_parameter() -> None:
    base = _config()
    changes = [
        dict(round_id=4),
        dict(session_nonce=bytes(32)),
        dict(site_ids=(1, 2, 4)),
        dict(bit_width=31),
        dict(update_length=5),
        dict(update_clip=0.5),
        dict(max_weight=9),
        dict(roster_digest=b"s" * 32),
        dict(corrupt_sites=2),
        dict(dropout_sites=0),
        dict(graph_degree=2),
        dict(graph_threshold=3),
    ]
    digests = {base.digest()} | {_config(**change).digest() for change in changes}
    assert len(digests) == len(changes) + 1


def test_the_honest_but_curious_setup_payload_is_unchanged() -> None:
    passive = _config(roster_digest=b"", corrupt_sites=0, dropout_sites=0)
    assert not passive.active
    assert set(passive.to_payload()) == {
        "round",
        "session_nonce",
        "site_ids",
        "bit_width",
        "update_length",
        "update_clip",
        "max_weight",
        "metric_names",
        "metric_lower",
        "metric_upper",
    }
    with pytest.raises(ValueError, match="need the active mode"):
        _config(roster_digest=b"")
    assert SecAggRoundConfig.from_payload(_config().to_payload()) == _config()


def test_the_graph_seed_changes_with_any_signed_key_and_not_with_ordering() -> None:
    ids = (5, 9, 2**64 - 5)
    names = {5: "a", 9: "b", 2**64 - 5: "c"}
    channel = {site: os.urandom(32) for site in ids}
    mask = {site: os.urandom(32) for site in ids}
    seed = graph_seed(
        parameters_digest=b"p" * 32,
        participant_ids=ids,
        names=names,
        channel_public_keys=channel,
        mask_public_keys=mask,
    )
    assert seed == graph_seed(
        parameters_digest=b"p" * 32,
        participant_ids=tuple(reversed(ids)),
        names=dict(reversed(names.items())),
        channel_public_keys=channel,
        mask_public_keys=mask,
    )
    for site in ids:
        fresh = dict(mask) | {site: os.urandom(32)}
        assert seed != graph_seed(
            parameters_digest=b"p" * 32,
            participant_ids=ids,
            names=names,
            channel_public_keys=channel,
            mask_public_keys=fresh,
        )
    assert seed != graph_seed(
        parameters_digest=b"p" * 32,
        participant_ids=ids[:2],
        names=names,
        channel_public_keys=channel,
        mask_public_keys=mask,
    )
