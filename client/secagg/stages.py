"""The site-side stages of SecAgg+, as pure functions over ``ClientSecAggState``.

Protocol: Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+), whose complete-graph case is Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017. Each stage takes the state
and the coordinator's request (a plain dict) and returns the new state and the reply (a plain
dict of ints, bytes, lists and numpy arrays, ready for a Flower ConfigRecord/ArrayRecord):

1. :func:`client_setup`: validate the round config against the site's policy, make fresh
   X25519 channel and mask key pairs, advertise the public keys.
2. :func:`client_share_keys`: given the neighbour graph over the sites that finished setup
   (U1; ``common.secagg.round_graph``) and the neighbours' public keys, check the graph's
   degree and threshold against the site's own policy (``client.secagg.policy``), draw a
   fresh self-mask seed, Shamir-share it and the mask private key among the neighbours and
   itself, and seal each neighbour's shares with AES-GCM under the pairwise channel key.
3. :func:`client_masked_input`: open the neighbours' sealed shares, encode (weight * update,
   weight, metrics) into Z_(2^b), add the self mask and the signed pairwise masks.
4. :func:`client_unmask`: reveal the self-mask-seed shares of surviving neighbours and the
   mask-key shares of dropped ones, never both for one site.

Active-coordinator mode (the round config names a roster; Bonawitz et al. section 6;
``client.secagg.active_checks``, ``common.secagg.active_parameters``): setup signs the two
public keys with the site's roster key, over the round's parameter digest; share keys
verifies every participant's signed keys and derives the graph from their hash; every derived
key and sealed bundle is bound to the parameters, the graph and both public keys
(``common.secagg.round_binding``); masked input needs k - D partners; a fifth stage,
:func:`client_consistency`, signs the survivor set before unmasking, and
:func:`client_unmask` then reveals shares only once t_cc survivors signed that same set, and
takes survivors and dropouts from it, not from the coordinator. The roster identity
(``client.secagg.site_identity``) is passed to each stage that signs or verifies; the
honest-but-curious mode is unchanged when the config names no roster.

An honest site refuses (raises :class:`SecAggRefusal`, a subclass of
``InvalidPayloadError``) anything malformed or hostile: a request out of round or stage
order (a replay), keys or shares from sites that are not its neighbours, duplicated senders,
ciphertexts that fail authentication, too few participants for the threshold, a degree or
threshold weaker than its policy, fewer sites than its minimum aggregation size (at share
keys: the sites that finished setup; at unmask: the survivors;
``client.secagg.aggregation_floor``), or a request to reveal both secrets of a site. A refusal
leaves the previous state valid; to the coordinator the site has dropped out. Secrets are
never logged or put in error messages.

Departures from the papers: the graph is fixed after setup, over U1 (``round_graph`` says
why), and the minimum aggregation size is this project's addition
(``common.secagg.aggregation_size``).

No torch here: a deployed site may run these stages in a freshly started runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmm.client.secagg import active_checks
from fedmm.client.secagg.aggregation_floor import SiteAggregationFloor
from fedmm.client.secagg.next_round_keys import NextRoundKeys, claim_next_round_keys
from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.client.secagg.site_identity import SiteIdentity
from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.active_parameters import ActiveGraphParameters
from fedmm.common.secagg.input_encoding import encode_site_input
from fedmm.common.secagg.key_agreement import (
    PUBLIC_KEY_BYTES,
    PURPOSE_CHANNEL,
    PURPOSE_PAIRWISE_MASK,
    KeyAgreementError,
    derive_channel_key,
    derive_pairwise_mask_seed,
    generate_private_key,
    load_private_key,
    public_key_for,
)
from fedmm.common.secagg.mask_expansion import SEED_BYTES, add_masks_in_place
from fedmm.common.secagg.protocol_stages import (
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    require_tag,
    tag,
)
from fedmm.common.secagg.quantisation import new_rounding_generator
from fedmm.common.secagg.round_binding import pair_binding, session_digest
from fedmm.common.secagg.round_config import MAX_SITES, SecAggRoundConfig
from fedmm.common.secagg.round_graph import RoundGraph
from fedmm.common.secagg.round_signatures import round_keys_message, sign, survivor_set_message
from fedmm.common.secagg.shamir import SHARE_BYTES, split_secret
from fedmm.common.secagg.share_cipher import (
    SEALED_SHARE_BUNDLE_BYTES,
    ShareCipherError,
    open_share_bundle,
    seal_share_bundle,
)
from fedmm.common.site_refusal import RefusalCode

__all__ = [
    "ClientSecAggPolicy",
    "ClientSecAggState",
    "SecAggRefusal",
    "client_consistency",
    "client_masked_input",
    "client_setup",
    "client_share_keys",
    "client_state_from_record",
    "client_state_to_record",
    "client_unmask",
]


@dataclass(frozen=True)
class ClientSecAggState:
    """What a site keeps between the stages of one round (secrets included: keep it local)."""

    site_id: int
    config: SecAggRoundConfig
    stage: str
    channel_private_key: bytes
    mask_private_key: bytes
    policy: ClientSecAggPolicy = field(default_factory=ClientSecAggPolicy)
    #: Distributed DP: the honest sites this site's noise share assumes in every sum (h).
    honest_sites: int = 0
    graph: RoundGraph | None = None
    self_mask_seed: bytes = b""
    peer_channel_keys: Mapping[int, bytes] = field(default_factory=dict)
    peer_mask_keys: Mapping[int, bytes] = field(default_factory=dict)
    held_seed_shares: Mapping[int, bytes] = field(default_factory=dict)
    held_key_shares: Mapping[int, bytes] = field(default_factory=dict)
    mask_partners: tuple[int, ...] = ()
    #: Active mode: the roster names of the participants (verified at share keys) and the
    #: survivor set this site signed in the consistency check.
    participant_names: Mapping[int, str] = field(default_factory=dict)
    agreed_survivors: tuple[int, ...] = ()

    def __repr__(self) -> str:  # never print key material
        return (
            f"ClientSecAggState(site_id={self.site_id}, round={self.config.round_id}, "
            f"stage={self.stage!r}, peers={len(self.peer_mask_keys)}, "
            f"partners={len(self.mask_partners)})"
        )

    @property
    def floor(self) -> SiteAggregationFloor:
        """This site's minimum aggregation size for the round (policy and h)."""
        return self.policy.floor(honest_sites=self.honest_sites)

    @property
    def threshold(self) -> int:
        if self.graph is None:
            raise SecAggRefusal("no neighbour graph yet", code=RefusalCode.OUT_OF_ORDER)
        return self.graph.threshold

    @property
    def active_parameters(self) -> ActiveGraphParameters:
        """Active mode: the graph and thresholds of the round's signed parameters."""
        if self.graph is None:
            raise SecAggRefusal("no neighbour graph yet", code=RefusalCode.OUT_OF_ORDER)
        return self.config.active_graph(self.graph.num_participants)

    def pair_bindings(self) -> PairBindings:
        """What this site's keys with each peer are bound to (active mode; empty bindings in
        the honest-but-curious mode, which keeps its keys exactly as before)."""
        if not self.config.active or self.graph is None:
            return PairBindings(session=b"", site_id=self.site_id, own_public_keys={})
        return PairBindings(
            session=session_digest(
                parameters_digest=self.config.digest(), graph_digest=self.graph.digest()
            ),
            site_id=self.site_id,
            own_public_keys={
                PURPOSE_CHANNEL: public_key_for(self.channel_private_key),
                PURPOSE_PAIRWISE_MASK: public_key_for(self.mask_private_key),
            },
        )


@dataclass(frozen=True)
class PairBindings:
    """The pair binding (``common.secagg.round_binding``) of one site's keys, per peer."""

    session: bytes
    site_id: int
    own_public_keys: Mapping[str, bytes]

    def __call__(self, *, purpose: str, peer: int, peer_public_key: bytes) -> bytes:
        if not self.session:
            return b""
        return pair_binding(
            session=self.session,
            purpose=purpose,
            site_a=self.site_id,
            public_key_a=self.own_public_keys[purpose],
            site_b=peer,
            public_key_b=peer_public_key,
        )


def client_setup(
    *,
    site_id: int,
    request: Mapping[str, Any],
    policy: ClientSecAggPolicy | None = None,
    previous_round: int | None = None,
    identity: SiteIdentity | None = None,
    advertised_keys: NextRoundKeys | None = None,
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """Stage 1: check the round config against the site's policy and advertise fresh keys.

    ``advertised_keys``: the key pairs this site made for this round in the unmask stage of
    an earlier one (``client.secagg.next_round_keys``), already taken out of its state; they
    are used instead of fresh ones, refused when made for another round, and not signed
    again (their signature went with the advertisement).

    ``previous_round`` is the last round this site took part in; a request for that round or
    an earlier one is a replay and is refused. A round that samples fewer sites than the
    site's minimum aggregation size is refused here, before the site trains. ``policy``:
    the site's own (default: :class:`ClientSecAggPolicy`'s defaults). ``identity``: the
    site's roster name and signing key, needed in active-coordinator mode, where the reply
    also carries ``site_name`` and ``key_signature`` (the keys signed over the round's
    parameter digest and this site's node id).
    """
    policy = ClientSecAggPolicy() if policy is None else policy
    try:
        config = SecAggRoundConfig.from_payload(request)
        require_tag(request, round_id=config.round_id, stage=STAGE_SETUP)
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"setup request rejected: {error}") from None
    if previous_round is not None and config.round_id <= previous_round:
        raise SecAggRefusal(
            f"setup for round {config.round_id} replays or precedes round {previous_round}",
            code=RefusalCode.OUT_OF_ORDER,
        )
    if site_id not in config.site_ids:
        raise SecAggRefusal("this site is not among the round's sites")
    if policy.require_active_coordinator and not config.active:
        raise SecAggRefusal(
            "this site's policy requires active-coordinator mode (signed keys, roster, "
            "consistency check); the round does not run in it",
            code=RefusalCode.SECAGG_POLICY,
        )
    if config.active:
        identity = active_checks.check_active_setup(config, policy, identity)
    else:
        policy.floor().require(
            config.num_sites, num_sampled=config.num_sites, what="sites sampled for the round"
        )
    if config.update_length > policy.max_update_length:
        raise SecAggRefusal(
            "update length exceeds this site's maximum", code=RefusalCode.SECAGG_POLICY
        )
    if advertised_keys is not None:
        keys = claim_next_round_keys(advertised_keys, round_id=config.round_id)
        channel_private_key, mask_private_key = keys.channel_private_key, keys.mask_private_key
    else:
        channel_private_key, mask_private_key = generate_private_key(), generate_private_key()
    state = ClientSecAggState(
        site_id=site_id,
        config=config,
        stage=STAGE_SETUP,
        channel_private_key=channel_private_key,
        mask_private_key=mask_private_key,
        policy=policy,
    )
    channel_public_key = public_key_for(state.channel_private_key)
    mask_public_key = public_key_for(state.mask_private_key)
    reply = tag(round_id=config.round_id, stage=STAGE_SETUP) | {
        "channel_public_key": channel_public_key,
        "mask_public_key": mask_public_key,
    }
    if identity is not None and config.active and advertised_keys is None:
        reply["site_name"] = identity.name
        reply["key_signature"] = sign(
            identity.signing_key,
            round_keys_message(
                parameters_digest=config.digest(),
                site_id=site_id,
                site_name=identity.name,
                channel_public_key=channel_public_key,
                mask_public_key=mask_public_key,
            ),
        )
    return state, reply


def client_share_keys(
    *,
    state: ClientSecAggState,
    request: Mapping[str, Any],
    identity: SiteIdentity | None = None,
    advertised_exchange: str = "",
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """Stage 2: check the graph over U1, then share the self-mask seed and the mask key among
    the neighbours and seal their shares.

    ``advertised_exchange`` (``train`` or ``evaluate``): the participants' keys were
    advertised for this round in an earlier round's unmask replies, so in active mode their
    signatures are over the roster, the exchange and the round id
    (``round_signatures.advertised_keys_message``) instead of the round's parameters.

    The request carries U1 (``participant_ids``), the degree and threshold fixed for |U1|,
    and the public keys of exactly this site's neighbours in that graph. In active mode it
    carries the signed keys of every participant instead (``participant_names``,
    ``channel_public_keys``, ``mask_public_keys``, ``key_signatures``, aligned with
    ``site_ids`` = ``participant_ids``): the site verifies them all against the roster and
    derives the graph from their hash (``identity`` is needed).
    """
    config = state.config
    _require_stage(state, request, previous=STAGE_SETUP, stage=STAGE_SHARE_KEYS)
    names: dict[int, str] = {}
    if config.active:
        identity = active_checks.require_identity(identity)
        verified = active_checks.verified_share_keys(
            config=config,
            policy=state.policy,
            identity=identity,
            request=request,
            site_id=state.site_id,
            own_channel_public_key=public_key_for(state.channel_private_key),
            own_mask_public_key=public_key_for(state.mask_private_key),
            advertised_exchange=advertised_exchange,
        )
        graph = verified.graph
        active_checks.require_active_floor(
            config,
            state.policy,
            graph.num_participants,
            what="sites finished setup",
            honest_sites=state.honest_sites,
        )
        active_checks.check_active_graph_policy(verified.parameters, state.policy)
        names = verified.names
        peer_ids = sorted(graph.neighbours[state.site_id])
        channel_keys = [verified.channel_public_keys[peer] for peer in peer_ids]
        mask_keys = [verified.mask_public_keys[peer] for peer in peer_ids]
    else:
        graph, peer_ids, channel_keys, mask_keys = _neighbour_keys(state, request)
    holders = sorted([*peer_ids, state.site_id])
    xs = {site: config.share_x(site) for site in holders}
    self_mask_seed = os.urandom(SEED_BYTES)
    seed_shares = split_secret(
        secret=self_mask_seed, threshold=graph.threshold, share_xs=list(xs.values())
    )
    key_shares = split_secret(
        secret=state.mask_private_key, threshold=graph.threshold, share_xs=list(xs.values())
    )
    with_graph = dataclasses.replace(state, graph=graph)
    bindings = with_graph.pair_bindings()
    sealed_bundles = []
    try:
        own_channel_key = load_private_key(state.channel_private_key)
        for peer, channel_key in zip(peer_ids, channel_keys, strict=True):
            binding = bindings(purpose=PURPOSE_CHANNEL, peer=peer, peer_public_key=channel_key)
            key = derive_channel_key(
                own_private_key=own_channel_key,
                peer_public_key=channel_key,
                round_id=config.round_id,
                session_nonce=config.session_nonce,
                own_id=state.site_id,
                peer_id=peer,
                binding=binding,
            )
            sealed_bundles.append(
                seal_share_bundle(
                    key=key,
                    self_mask_seed_share=seed_shares[xs[peer]],
                    mask_key_share=key_shares[xs[peer]],
                    sender_id=state.site_id,
                    receiver_id=peer,
                    round_id=config.round_id,
                    session_nonce=config.session_nonce,
                    binding=binding,
                )
            )
    except KeyAgreementError as error:
        raise SecAggRefusal(f"share-keys request: {error}") from None
    own_x = xs[state.site_id]
    new_state = dataclasses.replace(
        with_graph,
        stage=STAGE_SHARE_KEYS,
        self_mask_seed=self_mask_seed,
        peer_channel_keys=dict(zip(peer_ids, channel_keys, strict=True)),
        peer_mask_keys=dict(zip(peer_ids, mask_keys, strict=True)),
        held_seed_shares={state.site_id: seed_shares[own_x]},
        held_key_shares={state.site_id: key_shares[own_x]},
        participant_names=names,
    )
    reply = tag(round_id=config.round_id, stage=STAGE_SHARE_KEYS) | {
        "receiver_ids": list(peer_ids),
        "sealed_bundles": sealed_bundles,
    }
    return new_state, reply


def _neighbour_keys(
    state: ClientSecAggState, request: Mapping[str, Any]
) -> tuple[RoundGraph, list[int], list[bytes], list[bytes]]:
    """Honest-but-curious mode: the graph over U1 and exactly the neighbours' keys."""
    config = state.config
    try:
        graph = RoundGraph.from_payload(request, config=config)
        peer_ids = check.require_list(request, "site_ids", item_type=int, max_length=MAX_SITES)
        channel_keys = check.require_list(
            request, "channel_public_keys", item_type=bytes, max_length=MAX_SITES
        )
        mask_keys = check.require_list(
            request, "mask_public_keys", item_type=bytes, max_length=MAX_SITES
        )
        check.require_distinct_ids(peer_ids, name="site_ids")
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"share-keys request rejected: {error}") from None
    if state.site_id not in graph.participant_ids:
        raise SecAggRefusal("share-keys request does not list this site among the participants")
    state.floor.require(
        graph.num_participants, num_sampled=config.num_sites, what="sites finished setup"
    )
    state.policy.require_graph(graph, num_sampled=config.num_sites)
    if not len(peer_ids) == len(channel_keys) == len(mask_keys):
        raise SecAggRefusal("share-keys request: one channel and one mask key per site")
    neighbours = graph.neighbours[state.site_id]
    strangers = set(peer_ids) - neighbours
    if strangers:
        raise SecAggRefusal(f"share-keys request names non-neighbours {sorted(strangers)}")
    if set(peer_ids) != neighbours:
        raise SecAggRefusal(
            f"share-keys request lacks the keys of {len(neighbours - set(peer_ids))} neighbours"
        )
    if any(len(key) != PUBLIC_KEY_BYTES for key in channel_keys + mask_keys):
        raise SecAggRefusal(f"public keys must be {PUBLIC_KEY_BYTES} bytes")
    own_keys = {public_key_for(state.channel_private_key), public_key_for(state.mask_private_key)}
    if own_keys & set(channel_keys + mask_keys) or len(set(channel_keys + mask_keys)) != 2 * len(
        peer_ids
    ):
        raise SecAggRefusal("share-keys request repeats a public key")
    return graph, peer_ids, channel_keys, mask_keys


def client_masked_input(
    *,
    state: ClientSecAggState,
    request: Mapping[str, Any],
    update: np.ndarray,
    weight: int,
    metrics: Mapping[str, float] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """Stage 3 from the plain input: encode it (``encode_site_input``), then
    :func:`client_masked_encoded_input`.

    ``update`` (flat float vector of ``update_length``), ``weight`` (the example count) and
    ``metrics`` (one float per round metric name) are encoded into one vector, so the weight
    and metrics are masked like the update. ``rng`` drives stochastic rounding only (default:
    seeded from ``os.urandom``). A local input that does not fit the round's config (wrong
    length, weight above ``max_weight``, missing metric, non-finite values) raises a plain
    ``ValueError``: the caller's mistake, not the coordinator's.
    """
    encoded = encode_site_input(
        config=state.config,
        update=update,
        weight=weight,
        metrics=metrics or {},
        rng=rng if rng is not None else new_rounding_generator(),
    )
    return client_masked_encoded_input(state=state, request=request, encoded_input=encoded)


def client_masked_encoded_input(
    *, state: ClientSecAggState, request: Mapping[str, Any], encoded_input: np.ndarray
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """Stage 3: open the neighbours' shares and send the masked input.

    ``encoded_input`` is the site's input already encoded in the round's ring
    (``encode_site_input``: a site encodes its update when it is trained, so it waits
    quantised); it is masked in place. One of another length or type raises a plain
    ``ValueError``. In active mode the site needs shares from at least k - D neighbours
    (``active_parameters``).
    """
    config = state.config
    if encoded_input.shape != (config.masked_length,) or encoded_input.dtype != config.dtype:
        raise ValueError(
            f"the encoded input must be {config.masked_length} entries of {config.dtype}, "
            f"got {encoded_input.shape} of {encoded_input.dtype}"
        )
    _require_stage(state, request, previous=STAGE_SHARE_KEYS, stage=STAGE_MASKED_INPUT)
    try:
        sender_ids = check.require_list(request, "sender_ids", item_type=int, max_length=MAX_SITES)
        sealed_bundles = check.require_list(
            request, "sealed_bundles", item_type=bytes, max_length=MAX_SITES
        )
        check.require_distinct_ids(sender_ids, name="sender_ids")
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"masked-input request rejected: {error}") from None
    if len(sender_ids) != len(sealed_bundles):
        raise SecAggRefusal("masked-input request: one sealed bundle per sender")
    strangers = set(sender_ids) - set(state.peer_mask_keys)
    if strangers:
        raise SecAggRefusal(
            f"masked-input request holds shares from non-neighbours {sorted(strangers)}"
        )
    if len(sender_ids) + 1 < state.threshold:
        raise SecAggRefusal(
            f"shares from {len(sender_ids)} neighbours; threshold {state.threshold} needs "
            f"at least {state.threshold - 1}"
        )
    if config.active:
        active_checks.check_partners(state.active_parameters, sender_ids)
    seed_shares = dict(state.held_seed_shares)
    key_shares = dict(state.held_key_shares)
    own_channel_key = load_private_key(state.channel_private_key)
    bindings = state.pair_bindings()
    for sender, sealed in zip(sender_ids, sealed_bundles, strict=True):
        if len(sealed) != SEALED_SHARE_BUNDLE_BYTES:
            raise SecAggRefusal(f"sealed bundle from site {sender} has the wrong length")
        binding = bindings(
            purpose=PURPOSE_CHANNEL, peer=sender, peer_public_key=state.peer_channel_keys[sender]
        )
        try:
            key = derive_channel_key(
                own_private_key=own_channel_key,
                peer_public_key=state.peer_channel_keys[sender],
                round_id=config.round_id,
                session_nonce=config.session_nonce,
                own_id=state.site_id,
                peer_id=sender,
                binding=binding,
            )
            seed_shares[sender], key_shares[sender] = open_share_bundle(
                key=key,
                sealed=sealed,
                sender_id=sender,
                receiver_id=state.site_id,
                round_id=config.round_id,
                session_nonce=config.session_nonce,
                binding=binding,
            )
        except (ShareCipherError, KeyAgreementError) as error:
            raise SecAggRefusal(f"sealed bundle from site {sender}: {error}") from None
    masked = encoded_input
    # The self mask and one pairwise mask per partner: + if this site's id is the lower one.
    add_seeds, subtract_seeds = [state.self_mask_seed], []
    own_mask_key = load_private_key(state.mask_private_key)
    for partner in sorted(sender_ids):
        seed = derive_pairwise_mask_seed(
            own_private_key=own_mask_key,
            peer_public_key=state.peer_mask_keys[partner],
            round_id=config.round_id,
            session_nonce=config.session_nonce,
            own_id=state.site_id,
            peer_id=partner,
            binding=bindings(
                purpose=PURPOSE_PAIRWISE_MASK,
                peer=partner,
                peer_public_key=state.peer_mask_keys[partner],
            ),
        )
        (add_seeds if state.site_id < partner else subtract_seeds).append(seed)
    add_masks_in_place(
        masked, add_seeds=add_seeds, subtract_seeds=subtract_seeds, bit_width=config.bit_width
    )
    new_state = dataclasses.replace(
        state,
        stage=STAGE_MASKED_INPUT,
        held_seed_shares=seed_shares,
        held_key_shares=key_shares,
        mask_partners=tuple(sorted(sender_ids)),
    )
    reply = tag(round_id=config.round_id, stage=STAGE_MASKED_INPUT) | {"masked_input": masked}
    return new_state, reply


def client_consistency(
    *,
    state: ClientSecAggState,
    request: Mapping[str, Any],
    identity: SiteIdentity | None,
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """Active mode, between masked input and unmask: sign the survivor set (Bonawitz et al.,
    section 6, ConsistencyCheck).

    The request carries ``survivor_ids``: U3, every site whose masked input the coordinator
    says it summed. The site signs it (``survivor_signature``) only when it lists this site,
    is a subset of the participants, misses at most the D dropouts the round allows, and is
    at least this site's minimum aggregation size and the t_cc signatures the unmask stage
    will need. It runs once per round: a site signs one survivor set only.
    """
    config = state.config
    if not config.active:
        raise SecAggRefusal(
            "consistency request for a round that does not run in active-coordinator mode"
        )
    identity = active_checks.require_identity(identity)
    _require_stage(state, request, previous=STAGE_MASKED_INPUT, stage=STAGE_CONSISTENCY)
    try:
        survivors = check.require_list(request, "survivor_ids", item_type=int, max_length=MAX_SITES)
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"consistency request rejected: {error}") from None
    if state.graph is None:  # set at share keys, which this stage follows
        raise SecAggRefusal("no neighbour graph yet", code=RefusalCode.OUT_OF_ORDER)
    active_checks.check_survivor_set(
        config=config,
        policy=state.policy,
        parameters=state.active_parameters,
        graph=state.graph,
        site_id=state.site_id,
        survivors=survivors,
        honest_sites=state.honest_sites,
    )
    signature = sign(
        identity.signing_key,
        survivor_set_message(
            parameters_digest=config.digest(),
            graph_digest=state.graph.digest(),
            survivor_ids=survivors,
        ),
    )
    new_state = dataclasses.replace(
        state, stage=STAGE_CONSISTENCY, agreed_survivors=tuple(survivors)
    )
    reply = tag(round_id=config.round_id, stage=STAGE_CONSISTENCY) | {
        "survivor_signature": signature
    }
    return new_state, reply


def client_unmask(
    *,
    state: ClientSecAggState,
    request: Mapping[str, Any],
    identity: SiteIdentity | None = None,
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """Stage 4: reveal seed shares of surviving and key shares of dropped neighbours.

    Refuses a request that reports fewer survivors than this site's minimum aggregation size
    (:class:`~client.secagg.aggregation_floor.TooFewSites`: the round is dead for this site),
    that lists a site both as survivor and as dropped, that calls this site dropped, or that
    reports fewer survivors than the threshold. The stage runs once per round, so a later
    request cannot obtain the other secret of a site.

    Active mode: the request carries ``signer_ids`` and ``survivor_signatures``; the site
    reveals only when t_cc distinct survivors signed the survivor set it signed itself, and
    it takes survivors and dropped partners from that set, not from the coordinator.
    """
    if state.config.active:
        return _active_unmask(state=state, request=request, identity=identity)
    config = state.config
    _require_stage(state, request, previous=STAGE_MASKED_INPUT, stage=STAGE_UNMASK)
    try:
        survivors = check.require_list(request, "survivor_ids", item_type=int, max_length=MAX_SITES)
        dropped = check.require_list(request, "dropped_ids", item_type=int, max_length=MAX_SITES)
        num_survivors = check.require_int(
            request, "num_survivors", minimum=0, maximum=config.num_sites
        )
        check.require_distinct_ids(survivors, name="survivor_ids")
        check.require_distinct_ids(dropped, name="dropped_ids")
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"unmask request rejected: {error}") from None
    state.floor.require(num_survivors, num_sampled=config.num_sites, what="sites survived")
    both = set(survivors) & set(dropped)
    if both:
        raise SecAggRefusal(
            f"unmask request asks for both secrets of sites {sorted(both)}; refusing"
        )
    if state.site_id in dropped or state.site_id not in survivors:
        raise SecAggRefusal("unmask request does not list this site as a survivor")
    if num_survivors < state.threshold or num_survivors < len(survivors):
        raise SecAggRefusal(
            f"{num_survivors} survivors is below threshold {state.threshold} or inconsistent"
        )
    unknown = (set(survivors) | set(dropped)) - set(config.site_ids)
    if unknown:
        raise SecAggRefusal(f"unmask request names unknown sites {sorted(unknown)}")
    dropped_strangers = set(dropped) - set(state.mask_partners)
    if dropped_strangers:
        raise SecAggRefusal(
            f"unmask request asks for mask keys of non-partners {sorted(dropped_strangers)}"
        )
    return _reveal(state, survivors=survivors, dropped=dropped)


def _active_unmask(
    *, state: ClientSecAggState, request: Mapping[str, Any], identity: SiteIdentity | None
) -> tuple[ClientSecAggState, dict[str, Any]]:
    identity = active_checks.require_identity(identity)
    _require_stage(state, request, previous=STAGE_CONSISTENCY, stage=STAGE_UNMASK)
    if state.graph is None:  # set at share keys
        raise SecAggRefusal("no neighbour graph yet", code=RefusalCode.OUT_OF_ORDER)
    survivors = state.agreed_survivors
    active_checks.require_active_floor(
        state.config,
        state.policy,
        len(survivors),
        what="sites survived",
        honest_sites=state.honest_sites,
    )
    active_checks.check_survivor_signatures(
        identity=identity,
        config=state.config,
        graph=state.graph,
        parameters=state.active_parameters,
        names=state.participant_names,
        survivors=survivors,
        request=request,
    )
    dropped = [partner for partner in state.mask_partners if partner not in set(survivors)]
    return _reveal(state, survivors=list(survivors), dropped=dropped)


def _reveal(
    state: ClientSecAggState, *, survivors: list[int], dropped: list[int]
) -> tuple[ClientSecAggState, dict[str, Any]]:
    """The unmask reply: seed shares of surviving holders' owners, key shares of dropped."""
    seed_share_ids = sorted(site for site in survivors if site in state.held_seed_shares)
    key_share_ids = sorted(dropped)
    reply = tag(round_id=state.config.round_id, stage=STAGE_UNMASK) | {
        "seed_share_site_ids": seed_share_ids,
        "seed_shares": [state.held_seed_shares[site] for site in seed_share_ids],
        "key_share_site_ids": key_share_ids,
        "key_shares": [state.held_key_shares[site] for site in key_share_ids],
    }
    return dataclasses.replace(state, stage=STAGE_UNMASK), reply


def _require_stage(
    state: ClientSecAggState, request: Mapping[str, Any], *, previous: str, stage: str
) -> None:
    if state.stage != previous:
        raise SecAggRefusal(
            f"{stage} request out of order: this site's last stage was {state.stage!r}",
            code=RefusalCode.OUT_OF_ORDER,
        )
    try:
        require_tag(request, round_id=state.config.round_id, stage=stage)
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"{stage} request rejected: {error}") from None


# Persistence in Flower's context.state (a ConfigRecord holds ints, bytes, str and lists).


def client_state_to_record(state: ClientSecAggState) -> dict[str, Any]:
    """The state as a ConfigRecord-compatible dict (contains secrets: node-local only)."""
    peers = sorted(state.peer_mask_keys)
    seed_holders = sorted(state.held_seed_shares)
    key_holders = sorted(state.held_key_shares)
    return {
        "site_id": state.site_id,
        "config": _config_blob(state.config),
        "stage": state.stage,
        "channel_private_key": state.channel_private_key,
        "mask_private_key": state.mask_private_key,
        "policy": _policy_blob(state.policy),
        "honest_sites": state.honest_sites,
        "graph": b"" if state.graph is None else _graph_blob(state.graph),
        "self_mask_seed": state.self_mask_seed,
        "peer_ids": peers,
        "peer_channel_keys": [state.peer_channel_keys[site] for site in peers],
        "peer_mask_keys": [state.peer_mask_keys[site] for site in peers],
        "seed_share_site_ids": seed_holders,
        "seed_shares": [state.held_seed_shares[site] for site in seed_holders],
        "key_share_site_ids": key_holders,
        "key_shares": [state.held_key_shares[site] for site in key_holders],
        "mask_partners": list(state.mask_partners),
    } | _active_record(state)


def _active_record(state: ClientSecAggState) -> dict[str, Any]:
    """Active mode only (the honest-but-curious record is unchanged): U1's roster names and
    the signed survivor set."""
    if not state.config.active:
        return {}
    named = sorted(state.participant_names)
    return {
        "named_site_ids": named,
        "site_names": [state.participant_names[site] for site in named],
        "agreed_survivors": list(state.agreed_survivors),
    }


def client_state_from_record(record: Mapping[str, Any]) -> ClientSecAggState:
    """Inverse of :func:`client_state_to_record`."""
    config_payload = _config_from_blob(record["config"])
    config = SecAggRoundConfig.from_payload(config_payload)
    peers = [int(site) for site in record["peer_ids"]]
    seed_holders = [int(site) for site in record["seed_share_site_ids"]]
    key_holders = [int(site) for site in record["key_share_site_ids"]]
    state = ClientSecAggState(
        site_id=int(record["site_id"]),
        config=config,
        stage=str(record["stage"]),
        channel_private_key=bytes(record["channel_private_key"]),
        mask_private_key=bytes(record["mask_private_key"]),
        policy=ClientSecAggPolicy(**json.loads(bytes(record["policy"]).decode())),
        honest_sites=int(record["honest_sites"]),
        graph=_graph_from_blob(bytes(record["graph"]), config=config),
        self_mask_seed=bytes(record["self_mask_seed"]),
        peer_channel_keys=dict(zip(peers, record["peer_channel_keys"], strict=True)),
        peer_mask_keys=dict(zip(peers, record["peer_mask_keys"], strict=True)),
        held_seed_shares=dict(zip(seed_holders, record["seed_shares"], strict=True)),
        held_key_shares=dict(zip(key_holders, record["key_shares"], strict=True)),
        mask_partners=tuple(int(site) for site in record["mask_partners"]),
        participant_names=dict(
            zip(
                [int(site) for site in record.get("named_site_ids", [])],
                [str(name) for name in record.get("site_names", [])],
                strict=True,
            )
        ),
        agreed_survivors=tuple(int(site) for site in record.get("agreed_survivors", [])),
    )
    if any(len(share) != SHARE_BYTES for share in state.held_seed_shares.values()):
        raise ValueError("stored share has the wrong length")
    return state


def _config_blob(config: SecAggRoundConfig) -> bytes:
    payload = config.to_payload()
    payload["session_nonce"] = payload["session_nonce"].hex()
    if config.active:
        payload["roster_digest"] = payload["roster_digest"].hex()
    return json.dumps(payload, sort_keys=True).encode()


def _config_from_blob(blob: bytes) -> dict[str, Any]:
    payload = json.loads(bytes(blob).decode())
    payload["session_nonce"] = bytes.fromhex(payload["session_nonce"])
    payload["metric_lower"] = [float(value) for value in payload["metric_lower"]]
    payload["metric_upper"] = [float(value) for value in payload["metric_upper"]]
    payload["update_clip"] = float(payload["update_clip"])
    if "roster_digest" in payload:
        payload["roster_digest"] = bytes.fromhex(payload["roster_digest"])
    return payload


def _policy_blob(policy: ClientSecAggPolicy) -> bytes:
    return json.dumps(dataclasses.asdict(policy), sort_keys=True).encode()


def _graph_blob(graph: RoundGraph) -> bytes:
    payload = graph.to_payload() | ({"seed": graph.seed.hex()} if graph.seed else {})
    return json.dumps(payload, sort_keys=True).encode()


def _graph_from_blob(blob: bytes, *, config: SecAggRoundConfig) -> RoundGraph | None:
    if not blob:
        return None
    payload = json.loads(blob.decode())
    seed = bytes.fromhex(payload.pop("seed", ""))
    return RoundGraph.from_payload(payload, config=config, seed=seed)
