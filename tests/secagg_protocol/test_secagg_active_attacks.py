"""Attacks of an actively malicious coordinator, with and without active-coordinator mode.

Each attack runs against real sites (real Ed25519, X25519, HKDF, AES-GCM, AES-CTR and Shamir;
no mocks) twice: in the honest-but-curious mode, where it succeeds (for the key substitution,
the forged survivor set and the unknown site, the coordinator recovers a site's masked vector
exactly, update, weight and metric), and in active-coordinator mode, where the honest sites
refuse it and the coordinator learns nothing more than the sum (Bonawitz et al., "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, section 6; Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020). The tests
named ``..._without_active_mode`` are the evidence that each defence is needed: they assert
that the attack works there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.client.secagg.site_identity import load_site_identity
from fedmm.client.secagg.site_signing_key import create_site_signing_key
from fedmm.client.secagg.stages import ClientSecAggState
from fedmm.common.secagg.key_agreement import (
    derive_channel_key,
    derive_pairwise_mask_seed,
    generate_private_key,
    public_key_for,
)
from fedmm.common.secagg.mask_expansion import add_masks_in_place
from fedmm.common.secagg.neighbour_graph import neighbour_graph
from fedmm.common.secagg.roster import RosterError, add_site, load_roster, save_roster, sign_roster
from fedmm.common.secagg.round_config import SecAggRoundConfig
from fedmm.common.secagg.round_signatures import round_keys_message, sign, survivor_set_message
from fedmm.common.secagg.shamir import ShamirError, reconstruct_secret, split_secret
from fedmm.common.secagg.share_cipher import open_share_bundle, seal_share_bundle
from fedmm.common.site_refusal import RefusalCode
from fedmm.server.secagg.stages import (
    FINISHED,
    ServerSecAggState,
    server_collect_consistency,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_unmask,
)
from tests.secagg_protocol.active_federation import (
    SiteGroup,
    SiteInputs,
    make_federation,
    start_active_round,
    start_passive_round,
)

LENGTH = 64


def _unmasked(
    vector: np.ndarray,
    *,
    config: SecAggRoundConfig,
    site: int,
    self_mask_seed: bytes,
    pairwise_seeds: dict[int, bytes],
) -> np.ndarray:
    """A site's masked vector with its self mask and its pairwise masks taken off."""
    plain = vector.copy()
    add = [seed for partner, seed in pairwise_seeds.items() if partner < site]
    subtract = [self_mask_seed] + [
        seed for partner, seed in pairwise_seeds.items() if partner > site
    ]
    add_masks_in_place(plain, add_seeds=add, subtract_seeds=subtract, bit_width=config.bit_width)
    return plain


def _pairwise_seeds_of(
    *, config: SecAggRoundConfig, site: int, mask_key: bytes, peers: dict[int, bytes]
) -> dict[int, bytes]:
    """Every pairwise seed of ``site`` once its mask private key is known (passive mode)."""
    return {
        peer: derive_pairwise_mask_seed(
            own_private_key=mask_key,
            peer_public_key=public,
            round_id=config.round_id,
            session_nonce=config.session_nonce,
            own_id=site,
            peer_id=peer,
        )
        for peer, public in peers.items()
    }


# 1. Key substitution: the coordinator answers for every neighbour of its target.


def _substitute_neighbour_keys(request: dict, fakes: dict[int, tuple[bytes, bytes]]) -> dict:
    keys = [fakes.get(site) for site in request["site_ids"]]
    return request | {
        "channel_public_keys": [
            public_key_for(fake[0]) if fake else original
            for fake, original in zip(keys, request["channel_public_keys"], strict=True)
        ],
        "mask_public_keys": [
            public_key_for(fake[1]) if fake else original
            for fake, original in zip(keys, request["mask_public_keys"], strict=True)
        ],
    }


def test_key_substitution_recovers_the_update_without_active_mode() -> None:
    """No colluding site: the coordinator swaps in its own keys for the target's neighbours,
    opens the target's share bundles, rebuilds both its secrets and unmasks its vector."""
    site_ids = make_federation(8, seed=21).site_ids
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=21)
    sites = SiteGroup(None, inputs)
    server, requests = start_passive_round(site_ids, length=LENGTH)
    server, requests = server_collect_keys(
        state=server, replies=sites.answer_all("setup", requests)
    )
    config, graph = server.config, server.graph
    assert graph is not None
    target = site_ids[0]
    fakes = {peer: (generate_private_key(), generate_private_key()) for peer in site_ids}
    forged = _substitute_neighbour_keys(requests[target], fakes)
    reply = sites.answer("share_keys", target, forged)
    assert reply is not None  # accepted: nothing says whose keys these are

    seed_shares, key_shares, channel_keys = {}, {}, {}
    target_channel = server.channel_public_keys[target]
    for peer, sealed in zip(reply["receiver_ids"], reply["sealed_bundles"], strict=True):
        channel_keys[peer] = derive_channel_key(
            own_private_key=fakes[peer][0],
            peer_public_key=target_channel,
            round_id=config.round_id,
            session_nonce=config.session_nonce,
            own_id=peer,
            peer_id=target,
        )
        x = config.share_x(peer)
        seed_shares[x], key_shares[x] = open_share_bundle(
            key=channel_keys[peer],
            sealed=sealed,
            sender_id=target,
            receiver_id=peer,
            round_id=config.round_id,
            session_nonce=config.session_nonce,
        )
    self_mask_seed = reconstruct_secret(shares=seed_shares, threshold=graph.threshold)
    mask_key = reconstruct_secret(shares=key_shares, threshold=graph.threshold)

    # The target needs shares "from" its neighbours: the coordinator makes them up.
    junk = split_secret(
        secret=os.urandom(32), threshold=2, share_xs=[config.share_x(p) for p in channel_keys]
    )
    bundles = [
        seal_share_bundle(
            key=channel_keys[peer],
            self_mask_seed_share=junk[config.share_x(peer)],
            mask_key_share=junk[config.share_x(peer)],
            sender_id=peer,
            receiver_id=target,
            round_id=config.round_id,
            session_nonce=config.session_nonce,
        )
        for peer in channel_keys
    ]
    masked_request = {
        "round": config.round_id,
        "stage": "masked_input",
        "sender_ids": list(channel_keys),
        "sealed_bundles": bundles,
    }
    masked = sites.answer("masked_input", target, masked_request)
    assert masked is not None
    recovered = _unmasked(
        masked["masked_input"],
        config=config,
        site=target,
        self_mask_seed=self_mask_seed,
        pairwise_seeds=_pairwise_seeds_of(
            config=config,
            site=target,
            mask_key=mask_key,
            peers={peer: public_key_for(fakes[peer][1]) for peer in channel_keys},
        ),
    )
    np.testing.assert_array_equal(recovered, inputs.encoded(config, target))


@pytest.mark.parametrize("signatures", ["kept", "coordinator-signed"])
def test_key_substitution_is_refused_in_active_mode(signatures: str) -> None:
    federation = make_federation(8, seed=22)
    inputs = SiteInputs.random(federation.site_ids, length=LENGTH, seed=22)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, requests = start_active_round(federation, length=LENGTH)
    server, requests = server_collect_keys(
        state=server, replies=sites.answer_all("setup", requests)
    )
    target = federation.site_ids[0]
    others = [site for site in federation.site_ids if site != target]
    fakes = {peer: (generate_private_key(), generate_private_key()) for peer in others}
    forged = _substitute_neighbour_keys(requests[target], fakes)
    if signatures == "coordinator-signed":
        own_key = Ed25519PrivateKey.generate()  # the coordinator's: not in the roster
        forged["key_signatures"] = [
            sign(
                own_key,
                round_keys_message(
                    parameters_digest=server.config.digest(),
                    site_id=site,
                    site_name=name,
                    channel_public_key=channel,
                    mask_public_key=mask,
                ),
            )
            for site, name, channel, mask in zip(
                forged["site_ids"],
                forged["participant_names"],
                forged["channel_public_keys"],
                forged["mask_public_keys"],
                strict=True,
            )
        ]
    assert sites.answer("share_keys", target, forged) is None
    refusal = sites.refusals[target]
    assert refusal.code == RefusalCode.UNAUTHENTICATED
    assert "not signed for this round by a roster site" in str(refusal)
    assert sites.states[target].stage == "setup"  # no share of its secrets left the site


# 2. A forged survivor set: different sites are told different survivors.


def _through_masked_input(sites: SiteGroup, server: ServerSecAggState, requests: dict):
    server, requests = server_collect_keys(
        state=server, replies=sites.answer_all("setup", requests)
    )
    server, requests = server_route_shares(
        state=server, replies=sites.answer_all("share_keys", requests)
    )
    return server_collect_masked_inputs(
        state=server, replies=sites.answer_all("masked_input", requests)
    )


def test_a_forged_survivor_set_recovers_the_update_without_active_mode() -> None:
    """20 sites, Bell et al.'s default graph (k = 8, t = 3), no colluding site: two of the
    target's partners are told it survived and reveal its self-mask-seed shares, six are told
    it dropped and reveal its mask-key shares."""
    site_ids = make_federation(20, seed=23).site_ids
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=23)
    sites = SiteGroup(None, inputs)
    server, requests = _through_masked_input(sites, *start_passive_round(site_ids, length=LENGTH))
    config, graph = server.config, server.graph
    assert graph is not None and (graph.degree, graph.threshold) == (8, 3)
    target = site_ids[4]
    partners = list(server.share_senders[target])
    told_survived, told_dropped = partners[:2], partners[2:]
    for holder in told_dropped:
        request = requests[holder]
        requests[holder] = request | {
            "survivor_ids": [site for site in request["survivor_ids"] if site != target],
            "dropped_ids": sorted([*request["dropped_ids"], target]),
        }
    replies = sites.answer_all(
        "unmask", {site: requests[site] for site in [target, *told_survived, *told_dropped]}
    )
    assert not sites.refusals  # every honest holder believed what it was told
    seed_shares, key_shares = {}, {}
    for holder, reply in replies.items():
        x = config.share_x(holder)
        seeds = dict(zip(reply["seed_share_site_ids"], reply["seed_shares"], strict=True))
        keys = dict(zip(reply["key_share_site_ids"], reply["key_shares"], strict=True))
        if target in seeds:
            seed_shares[x] = seeds[target]
        if target in keys:
            key_shares[x] = keys[target]
    self_mask_seed = reconstruct_secret(shares=seed_shares, threshold=graph.threshold)
    mask_key = reconstruct_secret(shares=key_shares, threshold=graph.threshold)
    recovered = _unmasked(
        sites.masked_inputs[target],
        config=config,
        site=target,
        self_mask_seed=self_mask_seed,
        pairwise_seeds=_pairwise_seeds_of(
            config=config,
            site=target,
            mask_key=mask_key,
            peers={peer: server.mask_public_keys[peer] for peer in partners},
        ),
    )
    np.testing.assert_array_equal(recovered, inputs.encoded(config, target))


@pytest.mark.parametrize("first_group", [12, 10])
def test_a_forged_survivor_set_is_refused_in_active_mode(first_group: int) -> None:
    """Same attack, 20 sites (k = 11, t = 3, t_cc = 12), with two corrupt sites among the
    target's neighbours that sign both survivor sets and hand over their shares. Whichever
    way the coordinator splits the honest sites, one group collects fewer than 12 signatures
    over its set and does not unmask: the coordinator rebuilds at most one of the target's
    two secrets."""
    federation = make_federation(20, seed=24)
    inputs = SiteInputs.random(federation.site_ids, length=LENGTH, seed=24)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, _requests = _through_masked_input(sites, *start_active_round(federation, length=LENGTH))
    config, graph = server.config, server.graph
    assert graph is not None and config.corrupt_sites == 2
    target = federation.site_ids[4]
    partners = list(server.share_senders[target])
    corrupt = partners[:2]  # chosen after seeing the graph: the strongest case
    honest = [site for site in federation.site_ids if site not in corrupt]
    with_target = list(server.survivor_ids)
    without_target = [site for site in with_target if site != target]
    ordered = [target] + [site for site in honest if site != target]
    first = ordered[: first_group - len(corrupt)]  # told the target survived
    second = ordered[first_group - len(corrupt) :]  # told the target dropped
    views = {site: with_target for site in first} | {site: without_target for site in second}
    signatures: dict[tuple[int, ...], dict[int, bytes]] = {
        tuple(with_target): {},
        tuple(without_target): {},
    }
    for site in honest:
        reply = sites.answer(
            "consistency",
            site,
            {"round": config.round_id, "stage": "consistency", "survivor_ids": views[site]},
        )
        assert reply is not None
        signatures[tuple(views[site])][site] = reply["survivor_signature"]
    for site in corrupt:  # the corrupt sites sign both sets
        for view in signatures:
            signatures[view][site] = sign(
                federation.keys[site],
                _survivor_message(config, graph.digest(), list(view)),
            )
    seed_shares = {
        config.share_x(site): sites.states[site].held_seed_shares[target] for site in corrupt
    }
    key_shares = {
        config.share_x(site): sites.states[site].held_key_shares[target] for site in corrupt
    }
    for site in honest:
        signed = signatures[tuple(views[site])]
        reply = sites.answer(
            "unmask",
            site,
            {
                "round": config.round_id,
                "stage": "unmask",
                "signer_ids": sorted(signed),
                "survivor_signatures": [signed[signer] for signer in sorted(signed)],
            },
        )
        if reply is None:
            continue
        seeds = dict(zip(reply["seed_share_site_ids"], reply["seed_shares"], strict=True))
        keys = dict(zip(reply["key_share_site_ids"], reply["key_shares"], strict=True))
        if target in seeds:
            seed_shares[config.share_x(site)] = seeds[target]
        if target in keys:
            key_shares[config.share_x(site)] = keys[target]
    refused = {site for site in honest if site in sites.refusals}
    assert refused == set(first) or refused == set(second)
    assert all(sites.refusals[site].code == RefusalCode.UNAUTHENTICATED for site in refused)
    assert min(len(seed_shares), len(key_shares)) == len(corrupt) < graph.threshold
    with pytest.raises(ShamirError):
        reconstruct_secret(shares=min(seed_shares, key_shares, key=len), threshold=graph.threshold)


def _survivor_message(
    config: SecAggRoundConfig, graph_digest: bytes, survivors: list[int]
) -> bytes:
    return survivor_set_message(
        parameters_digest=config.digest(), graph_digest=graph_digest, survivor_ids=survivors
    )


def test_declaring_a_sites_neighbours_dropped_is_refused_in_active_mode() -> None:
    """To strip a site's input out of the sum in a sparse graph, an active coordinator calls
    its honest neighbours dropped. Sites sign no survivor set that misses more than the D
    dropouts the round allows, fewer than the target's honest partners."""
    federation = make_federation(20, seed=25)
    inputs = SiteInputs.random(federation.site_ids, length=LENGTH, seed=25)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, _requests = _through_masked_input(sites, *start_active_round(federation, length=LENGTH))
    parameters = server.active_parameters
    target = federation.site_ids[4]
    isolating = [site for site in server.survivor_ids if site not in server.share_senders[target]]
    assert len(server.survivor_ids) - len(isolating) > parameters.dropout_allowance
    request = {"round": server.config.round_id, "stage": "consistency", "survivor_ids": isolating}
    assert sites.answer_all("consistency", dict.fromkeys(isolating, request)) == {}
    assert all("the round allows 4" in str(refusal) for refusal in sites.refusals.values())


# 3. A replayed round key.


def _replace_keys(request: dict, site: int, keys: tuple[bytes, bytes, bytes | None]) -> dict:
    """The request with ``site``'s channel key, mask key (and signature) replaced."""
    if site not in request["site_ids"]:
        return request
    index = request["site_ids"].index(site)
    changed = dict(request)
    for field_name, value in zip(
        ("channel_public_keys", "mask_public_keys", "key_signatures"), keys, strict=True
    ):
        if value is not None:
            changed[field_name] = list(request[field_name])
            changed[field_name][index] = value
    return changed


def test_a_replayed_round_key_is_accepted_without_active_mode() -> None:
    """Site A dropped in round 5, so the coordinator rebuilt its mask key. In round 6 the
    coordinator replays A's round-5 keys: A's neighbours accept them, and every pairwise mask
    they agree with "A" is one the coordinator can compute."""
    site_ids = make_federation(8, seed=26).site_ids
    victim = site_ids[3]
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=26)
    first = SiteGroup(None, inputs)
    server, requests = start_passive_round(site_ids, length=LENGTH, round_id=5)
    server, requests = server_collect_keys(
        state=server, replies=first.answer_all("setup", requests)
    )
    server, requests = server_route_shares(
        state=server, replies=first.answer_all("share_keys", requests)
    )
    old_channel, old_mask = server.channel_public_keys[victim], server.mask_public_keys[victim]
    del requests[victim]  # A sends no masked input: its mask key is rebuilt to unmask the rest
    server, requests = server_collect_masked_inputs(
        state=server, replies=first.answer_all("masked_input", requests)
    )
    assert victim in server.dropped_ids
    replies = first.answer_all("unmask", requests)
    key_shares = {
        server.config.share_x(holder): dict(
            zip(reply["key_share_site_ids"], reply["key_shares"], strict=True)
        )[victim]
        for holder, reply in replies.items()
        if victim in reply["key_share_site_ids"]
    }
    assert server.graph is not None
    old_mask_key = reconstruct_secret(shares=key_shares, threshold=server.graph.threshold)
    assert public_key_for(old_mask_key) == old_mask

    second = SiteGroup(None, inputs)
    server, requests = start_passive_round(site_ids, length=LENGTH, round_id=6)
    server, requests = server_collect_keys(
        state=server, replies=second.answer_all("setup", requests)
    )
    replayed = {
        site: _replace_keys(request, victim, (old_channel, old_mask, None))
        for site, request in requests.items()
        if site != victim
    }
    second.answer_all("share_keys", replayed)
    neighbours = [site for site in replayed if victim in replayed[site]["site_ids"]]
    assert neighbours and not second.refusals
    for site in neighbours:
        state: ClientSecAggState = second.states[site]
        assert state.peer_mask_keys[victim] == old_mask
        used = derive_pairwise_mask_seed(
            own_private_key=state.mask_private_key,
            peer_public_key=old_mask,
            round_id=6,
            session_nonce=server.config.session_nonce,
            own_id=site,
            peer_id=victim,
        )
        known = derive_pairwise_mask_seed(
            own_private_key=old_mask_key,
            peer_public_key=server.mask_public_keys[site],
            round_id=6,
            session_nonce=server.config.session_nonce,
            own_id=victim,
            peer_id=site,
        )
        assert used == known


@pytest.mark.parametrize("replayed_from", ["earlier round", "other session of the round"])
def test_a_replayed_round_key_is_refused_in_active_mode(replayed_from: str) -> None:
    federation = make_federation(8, seed=27)
    victim = federation.site_ids[3]
    inputs = SiteInputs.random(federation.site_ids, length=LENGTH, seed=27)
    earlier_round = 5 if replayed_from == "earlier round" else 6
    first = SiteGroup(federation, inputs, federation.policy())
    _, requests = start_active_round(federation, length=LENGTH, round_id=earlier_round)
    old = first.answer_all("setup", requests)[victim]  # genuinely signed, by the victim

    second = SiteGroup(federation, inputs, federation.policy())
    server, requests = start_active_round(federation, length=LENGTH, round_id=6)
    server, requests = server_collect_keys(
        state=server, replies=second.answer_all("setup", requests)
    )
    replayed = {
        site: _replace_keys(
            request,
            victim,
            (old["channel_public_key"], old["mask_public_key"], old["key_signature"]),
        )
        for site, request in requests.items()
        if site != victim
    }
    assert second.answer_all("share_keys", replayed) == {}
    assert len(second.refusals) == len(replayed)
    for refusal in second.refusals.values():
        assert refusal.code == RefusalCode.UNAUTHENTICATED
        assert f"round keys of site {victim} are not signed for this round" in str(refusal)
    # An honest coordinator drops the replayed reply itself.
    server, requests = start_active_round(federation, length=LENGTH, round_id=6)
    setup = SiteGroup(federation, inputs, federation.policy()).answer_all("setup", requests)
    server, _ = server_collect_keys(state=server, replies=setup | {victim: old | {"round": 6}})
    assert victim not in server.advertised_ids
    assert len(server.advertised_ids) == len(federation.site_ids) - 1


# 4. An unknown site: Sybils the coordinator runs itself.


def test_sybil_sites_recover_the_update_without_active_mode() -> None:
    """The coordinator samples its target with four sites it runs itself: their shares
    rebuild both of the target's secrets."""
    site_ids = make_federation(5, seed=28).site_ids
    target, sybils = site_ids[0], site_ids[1:]
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=28)
    sites = SiteGroup(None, inputs)
    server, _requests = _through_masked_input(sites, *start_passive_round(site_ids, length=LENGTH))
    assert server.graph is not None
    config, threshold = server.config, server.graph.threshold
    seed_shares = {config.share_x(s): sites.states[s].held_seed_shares[target] for s in sybils}
    key_shares = {config.share_x(s): sites.states[s].held_key_shares[target] for s in sybils}
    recovered = _unmasked(
        sites.masked_inputs[target],
        config=config,
        site=target,
        self_mask_seed=reconstruct_secret(shares=seed_shares, threshold=threshold),
        pairwise_seeds=_pairwise_seeds_of(
            config=config,
            site=target,
            mask_key=reconstruct_secret(shares=key_shares, threshold=threshold),
            peers={peer: server.mask_public_keys[peer] for peer in sybils},
        ),
    )
    np.testing.assert_array_equal(recovered, inputs.encoded(config, target))


def _sybil_setup_reply(
    config: SecAggRoundConfig, site: int, name: str, key: Ed25519PrivateKey
) -> dict:
    channel, mask = public_key_for(generate_private_key()), public_key_for(generate_private_key())
    return {
        "round": config.round_id,
        "stage": "setup",
        "channel_public_key": channel,
        "mask_public_key": mask,
        "site_name": name,
        "key_signature": sign(
            key,
            round_keys_message(
                parameters_digest=config.digest(),
                site_id=site,
                site_name=name,
                channel_public_key=channel,
                mask_public_key=mask,
            ),
        ),
    }


def _share_keys_request(server: ServerSecAggState, setup: dict[int, dict]) -> dict:
    """What a malicious coordinator sends when it passes on every setup reply unchecked: the
    sites derive the graph from these keys themselves."""
    config = server.config
    everyone = sorted(setup)
    derived = config.active_graph(len(everyone))
    return {
        "round": config.round_id,
        "stage": "share_keys",
        "participant_ids": everyone,
        "degree": derived.degree,
        "threshold": derived.threshold,
        "site_ids": everyone,
        "participant_names": [setup[site]["site_name"] for site in everyone],
        "channel_public_keys": [setup[site]["channel_public_key"] for site in everyone],
        "mask_public_keys": [setup[site]["mask_public_key"] for site in everyone],
        "key_signatures": [setup[site]["key_signature"] for site in everyone],
    }


@pytest.mark.parametrize("sybil_names", ["own names", "names of absent roster sites"])
def test_sybil_sites_are_refused_in_active_mode(sybil_names: str) -> None:
    federation = make_federation(8, seed=29)
    target = federation.site_ids[0]
    absent = federation.site_ids[1:5]  # roster sites not sampled this round
    sybil_ids = [site + 2 for site in absent]  # node ids the coordinator made up
    inputs = SiteInputs.random(federation.site_ids, length=LENGTH, seed=29)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, requests = start_active_round(federation, length=LENGTH, sampled=[target, *sybil_ids])
    setup = {target: sites.answer("setup", target, requests[target])}
    assert setup[target] is not None
    for sybil, stolen in zip(sybil_ids, absent, strict=True):
        name = f"sybil-{sybil}" if sybil_names == "own names" else federation.names[stolen]
        setup[sybil] = _sybil_setup_reply(server.config, sybil, name, Ed25519PrivateKey.generate())
    assert sites.answer("share_keys", target, _share_keys_request(server, setup)) is None
    refusal = sites.refusals[target]
    assert refusal.code == RefusalCode.UNAUTHENTICATED
    reason = "is not in the roster" if sybil_names == "own names" else "does not verify"
    assert reason in str(refusal)
    # The honest coordinator drops them at once.
    server, _ = server_collect_keys(state=server, replies=setup)
    assert server.aborted and server.advertised_ids == (target,)


def test_a_corrupt_roster_site_behind_two_node_ids_is_refused_in_active_mode() -> None:
    federation = make_federation(8, seed=30)
    corrupt = federation.site_ids[1]
    clone = corrupt + 2
    sampled = [*federation.site_ids, clone]
    inputs = SiteInputs.random(sampled, length=LENGTH, seed=30)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, requests = start_active_round(federation, length=LENGTH, sampled=sampled)
    setup = sites.answer_all("setup", {s: r for s, r in requests.items() if s != clone})
    setup[clone] = _sybil_setup_reply(
        server.config, clone, federation.names[corrupt], federation.keys[corrupt]
    )
    request = _share_keys_request(server, setup)
    target = federation.site_ids[0]
    assert sites.answer("share_keys", target, request) is None
    assert "one roster site stands behind two node ids" in str(sites.refusals[target])
    server, _ = server_collect_keys(state=server, replies=setup)
    assert corrupt not in server.advertised_ids and clone not in server.advertised_ids


def test_an_unknown_site_added_to_the_roster_file_is_refused(tmp_path) -> None:
    """The coordinator hands the sites a roster file with its own site added and signed by
    it: the file no longer has the pinned digest, and the other sites' signatures no longer
    match it."""
    federation = make_federation(4, seed=31)
    path = tmp_path / "roster.json"
    save_roster(federation.roster.roster, path)
    intruder = Ed25519PrivateKey.generate()
    grown = add_site(
        load_roster(path),
        name="zz-coordinator",
        signing_key=intruder.public_key().public_bytes_raw(),
    )
    grown = dataclasses.replace(grown, signatures=dict(federation.roster.roster.signatures))
    save_roster(sign_roster(grown, private_key=intruder), path)
    key_file = tmp_path / "site.pem"
    create_site_signing_key(key_file)
    with pytest.raises(RosterError, match="not the roster you agreed to"):
        load_site_identity(
            roster_file=path, signing_key_file=key_file, pinned_digest=federation.roster.digest
        )
    with pytest.raises(RosterError, match="does not match this roster"):
        load_site_identity(roster_file=path, signing_key_file=key_file, pinned_digest=grown.digest)


# 5. A coordinator-chosen graph seed.

COLLUDERS = 2


def _ground_nonce(site_ids: list[int], target: int, colluders: list[int], degree: int) -> bytes:
    """A session nonce under which the target's neighbours include every colluder."""
    for attempt in range(100_000):
        nonce = hashlib.sha256(attempt.to_bytes(8, "big")).digest()
        graph = neighbour_graph(site_ids=site_ids, degree=degree, seed=nonce)
        if set(colluders) <= graph[target]:
            return nonce
    raise AssertionError("no nonce found")


def _with_nonce(server: ServerSecAggState, nonce: bytes) -> tuple[ServerSecAggState, dict]:
    config = dataclasses.replace(server.config, session_nonce=nonce)
    payload = config.to_payload() | {"stage": "setup"}
    return dataclasses.replace(server, config=config), {
        site: dict(payload) for site in config.site_ids
    }


def test_the_coordinator_chooses_the_graph_without_active_mode() -> None:
    """The session nonce seeds the graph, and the coordinator picks the nonce: offline, at
    leisure, it places its colluders around its target, and every site accepts the graph."""
    site_ids = make_federation(20, seed=32).site_ids
    target, colluders = site_ids[7], site_ids[:COLLUDERS]
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=32)
    sites = SiteGroup(None, inputs)
    server, _ = start_passive_round(site_ids, length=LENGTH)
    server, requests = _with_nonce(server, _ground_nonce(site_ids, target, colluders, degree=8))
    server, requests = server_collect_keys(
        state=server, replies=sites.answer_all("setup", requests)
    )
    replies = sites.answer_all("share_keys", requests)
    assert not sites.refusals
    assert set(colluders) <= set(replies[target]["receiver_ids"])


def test_a_coordinator_chosen_seed_does_not_choose_the_graph_in_active_mode() -> None:
    """The same ground nonce in active mode: every site draws the graph from the hash of the
    signed round keys, which the coordinator sees only after choosing the nonce; the graph
    the nonce would give is not the one the sites use, and any other degree or threshold is
    refused."""
    federation = make_federation(20, seed=33)
    site_ids = federation.site_ids
    target, colluders = site_ids[7], site_ids[:COLLUDERS]
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=33)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, _ = start_active_round(federation, length=LENGTH)
    nonce = _ground_nonce(site_ids, target, colluders, degree=11)
    server, requests = _with_nonce(server, nonce)
    server, requests = server_collect_keys(
        state=server, replies=sites.answer_all("setup", requests)
    )
    assert server.graph is not None
    chosen = neighbour_graph(site_ids=site_ids, degree=server.graph.degree, seed=nonce)
    other_degree = requests[target] | {"degree": server.graph.degree + 1}
    assert sites.answer("share_keys", target, other_degree) is None
    assert "differ from the" in str(sites.refusals.pop(target))
    replies = sites.answer_all("share_keys", requests)
    used = {site: set(reply["receiver_ids"]) for site, reply in replies.items()}
    assert used == {site: set(peers) for site, peers in server.graph.neighbours.items()}
    assert used != {site: set(peers) for site, peers in chosen.items()}
    assert server.graph.ring_seed != nonce


def test_grinding_the_graph_with_corrupt_keys_gains_nothing_in_active_mode() -> None:
    """What the coordinator can still do: have its two corrupt sites make fresh keys after
    seeing the honest ones until the seed puts both around its target. It then holds two
    shares of each of the target's secrets, but t = c + 1 = 3, and no honest site reveals the
    target's mask key, since every survivor agreed that the target survived."""
    federation = make_federation(20, seed=34)
    site_ids = federation.site_ids
    target, corrupt = site_ids[7], site_ids[:COLLUDERS]
    inputs = SiteInputs.random(site_ids, length=LENGTH, seed=34)
    sites = SiteGroup(federation, inputs, federation.policy())
    start, setup_requests = start_active_round(federation, length=LENGTH)
    assert start.config.corrupt_sites == COLLUDERS
    setup = sites.answer_all("setup", setup_requests)
    for _attempt in range(1000):
        for site in corrupt:  # fresh, genuinely signed keys: the corrupt sites may do that
            setup[site] = sites.answer("setup", site, setup_requests[site])
        server, requests = server_collect_keys(state=start, replies=setup)
        assert server.graph is not None
        if set(corrupt) <= server.graph.neighbours[target]:
            break
    else:
        raise AssertionError("grinding found no graph")
    server, requests = server_route_shares(
        state=server, replies=sites.answer_all("share_keys", requests)
    )
    server, requests = server_collect_masked_inputs(
        state=server, replies=sites.answer_all("masked_input", requests)
    )
    server, requests = server_collect_consistency(
        state=server, replies=sites.answer_all("consistency", requests)
    )
    replies = sites.answer_all("unmask", requests)
    server, aggregate = server_unmask(state=server, replies=replies)
    assert server.stage == FINISHED and aggregate is not None
    assert server.graph is not None and server.graph.threshold == COLLUDERS + 1
    config = server.config
    key_shares = {
        config.share_x(site): sites.states[site].held_key_shares[target] for site in corrupt
    }
    for holder, reply in replies.items():  # whatever honest sites revealed
        keys = dict(zip(reply["key_share_site_ids"], reply["key_shares"], strict=True))
        if target in keys and holder not in corrupt:
            key_shares[config.share_x(holder)] = keys[target]
    assert len(key_shares) == COLLUDERS
    with pytest.raises(ShamirError):
        reconstruct_secret(shares=key_shares, threshold=server.graph.threshold)
