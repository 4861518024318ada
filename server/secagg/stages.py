"""The coordinator's stages of SecAgg+, as pure functions over ``ServerSecAggState``.

Protocol: Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+; degree k < n - 1), and Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017 (k = n - 1). Each function takes the state and
the replies of one exchange and returns the new state and the requests of the next
(``{site_id: payload}``); the last returns the decoded aggregate:

- :func:`server_start_round`: fix the public round config; setup requests for all sites.
- :func:`server_collect_keys`: U1 = sites with valid public keys; share-keys requests carry
  each site's neighbours' keys.
- :func:`server_route_shares`: U2 = sites that sealed shares for exactly their neighbours in
  U1; masked-input requests route each site its neighbours' sealed bundles.
- :func:`server_collect_masked_inputs`: U3 = sites with a valid masked vector (the
  survivors); their sum is accumulated; unmask requests name survivors and dropped sites.
- :func:`server_unmask`: rebuild survivors' self-mask seeds and dropped sites' mask keys from
  the shares, remove all masks, dequantise the sum.

A reply that is malformed, duplicated, unexpected or for another round/stage is dropped with
a logged reason and its site counts as dropped out. When fewer than t sites remain at any
stage, or a needed secret cannot be rebuilt from t shares, the round is aborted:
``state.abort_reason`` says why, and later stages return nothing. No function raises on
inbound data, and no secret is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.secagg import payload_validation as check
from common.secagg.input_encoding import DecodedAggregate, decode_aggregate
from common.secagg.key_agreement import (
    PUBLIC_KEY_BYTES,
    KeyAgreementError,
    derive_pairwise_mask_seed,
    load_private_key,
)
from common.secagg.mask_expansion import add_masks_in_place
from common.secagg.neighbour_graph import (
    DEFAULT_ADVERSARIAL_RATE,
    DEFAULT_DROPOUT_RATE,
    default_graph_parameters,
)
from common.secagg.protocol_stages import (
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    require_tag,
    tag,
)
from common.secagg.ring import add_in_place, zeros
from common.secagg.round_config import MAX_SITES, SESSION_NONCE_BYTES, SecAggRoundConfig
from common.secagg.shamir import SHARE_BYTES, ShamirError, reconstruct_secret
from common.secagg.share_cipher import SEALED_SHARE_BUNDLE_BYTES

logger = logging.getLogger(__name__)

Payload = dict[str, Any]
Replies = Mapping[int, Mapping[str, Any]] | Iterable[tuple[int, Mapping[str, Any]]]

#: ``ServerSecAggState.stage`` values: the last exchange whose replies were processed.
AWAITING_KEYS = "awaiting_keys"
AWAITING_SHARES = "awaiting_shares"
AWAITING_MASKED_INPUTS = "awaiting_masked_inputs"
AWAITING_UNMASK = "awaiting_unmask"
FINISHED = "finished"
ABORTED = "aborted"


@dataclass(frozen=True, eq=False)
class ServerSecAggState:
    """The coordinator's view of one round; holds no site's plain input."""

    config: SecAggRoundConfig
    stage: str
    abort_reason: str | None = None
    channel_public_keys: Mapping[int, bytes] = field(default_factory=dict)
    mask_public_keys: Mapping[int, bytes] = field(default_factory=dict)
    share_senders: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    survivor_ids: tuple[int, ...] = ()
    dropped_ids: tuple[int, ...] = ()
    masked_sum: np.ndarray | None = None
    rejections: tuple[str, ...] = ()

    @property
    def aborted(self) -> bool:
        return self.stage == ABORTED

    @property
    def advertised_ids(self) -> tuple[int, ...]:
        """U1: sites whose public keys were accepted."""
        return tuple(sorted(self.mask_public_keys))

    @property
    def shared_ids(self) -> tuple[int, ...]:
        """U2: sites whose sealed shares were accepted and routed."""
        return tuple(sorted(self.share_senders))


def server_start_round(
    *,
    round_id: int,
    site_ids: Iterable[int],
    update_length: int,
    update_clip: float,
    max_weight: int,
    metric_ranges: Mapping[str, tuple[float, float]] | None = None,
    bit_width: int = 32,
    degree: int | None = None,
    threshold: int | None = None,
    adversarial_rate: float = DEFAULT_ADVERSARIAL_RATE,
    dropout_rate: float = DEFAULT_DROPOUT_RATE,
    integer_update: bool = False,
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Fix the round's public config and build the setup request for every site.

    ``integer_update``: the sites send integer vectors in Z_(2^b) (distributed DP), summed
    as is and centred on decoding.

    ``degree`` and ``threshold`` default to :func:`default_graph_parameters` for the number
    of sites (Bell et al.'s guidance; the complete graph for small n). Raises ``ValueError``
    for an invalid configuration (a programming error, not inbound data).
    """
    sites = tuple(sorted({int(site) for site in site_ids}))
    defaults = default_graph_parameters(
        len(sites), adversarial_rate=adversarial_rate, dropout_rate=dropout_rate
    )
    metric_ranges = dict(metric_ranges or {})
    names = tuple(sorted(metric_ranges))
    config = SecAggRoundConfig(
        round_id=round_id,
        session_nonce=os.urandom(SESSION_NONCE_BYTES),
        site_ids=sites,
        degree=defaults.degree if degree is None else degree,
        threshold=defaults.threshold if threshold is None else threshold,
        bit_width=bit_width,
        update_length=update_length,
        update_clip=float(update_clip),
        max_weight=max_weight,
        metric_names=names,
        metric_lower=tuple(float(metric_ranges[name][0]) for name in names),
        metric_upper=tuple(float(metric_ranges[name][1]) for name in names),
        integer_update=integer_update,
    )
    payload = config.to_payload() | tag(round_id=round_id, stage=STAGE_SETUP)
    state = ServerSecAggState(config=config, stage=AWAITING_KEYS)
    logger.info(
        "secagg round %d: %d sites, degree %d, threshold %d, %d-bit ring",
        round_id,
        len(sites),
        config.degree,
        config.threshold,
        bit_width,
    )
    return state, {site: dict(payload) for site in sites}


def server_collect_keys(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Accept the advertised public keys (U1) and send each site its neighbours' keys."""
    if state.stage != AWAITING_KEYS:
        return _wrong_stage(state, "collect_keys")
    config = state.config
    accepted, rejections = _unique_replies(
        replies, expected=set(config.site_ids), stage=STAGE_SETUP
    )
    channel_keys: dict[int, bytes] = {}
    mask_keys: dict[int, bytes] = {}
    for site, payload in accepted.items():
        try:
            require_tag(payload, round_id=config.round_id, stage=STAGE_SETUP)
            channel = check.require_bytes(payload, "channel_public_key", length=PUBLIC_KEY_BYTES)
            mask = check.require_bytes(payload, "mask_public_key", length=PUBLIC_KEY_BYTES)
        except check.InvalidPayloadError as error:
            rejections.append(_reject(site, STAGE_SETUP, str(error)))
            continue
        channel_keys[site], mask_keys[site] = channel, mask
    # A public key seen twice (within or across sites) is a replay or a copy: drop its owners.
    owners: dict[bytes, set[int]] = {}
    for site in channel_keys:
        for key in (channel_keys[site], mask_keys[site]):
            owners.setdefault(key, set()).add(site)
    copied = set()
    for site in channel_keys:
        if channel_keys[site] == mask_keys[site] or any(
            len(owners[key]) > 1 for key in (channel_keys[site], mask_keys[site])
        ):
            copied.add(site)
    for site in sorted(copied):
        rejections.append(_reject(site, STAGE_SETUP, "public key repeated"))
        del channel_keys[site], mask_keys[site]
    state = dataclasses.replace(
        state,
        stage=AWAITING_SHARES,
        channel_public_keys=channel_keys,
        mask_public_keys=mask_keys,
        rejections=state.rejections + tuple(rejections),
    )
    if len(mask_keys) < config.threshold:
        return _abort(
            state, f"{len(mask_keys)} sites advertised keys, threshold {config.threshold}"
        )
    requests = {}
    for site in sorted(mask_keys):
        peers = sorted(config.neighbours[site] & mask_keys.keys())
        requests[site] = tag(round_id=config.round_id, stage=STAGE_SHARE_KEYS) | {
            "site_ids": peers,
            "channel_public_keys": [channel_keys[peer] for peer in peers],
            "mask_public_keys": [mask_keys[peer] for peer in peers],
        }
    return state, requests


def server_route_shares(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Accept sealed share bundles (U2) and route each site the bundles addressed to it."""
    if state.stage != AWAITING_SHARES:
        return _wrong_stage(state, "route_shares")
    config = state.config
    advertised = set(state.mask_public_keys)
    accepted, rejections = _unique_replies(replies, expected=advertised, stage=STAGE_SHARE_KEYS)
    outgoing: dict[int, dict[int, bytes]] = {}
    for site, payload in accepted.items():
        try:
            require_tag(payload, round_id=config.round_id, stage=STAGE_SHARE_KEYS)
            receivers = check.require_list(
                payload, "receiver_ids", item_type=int, max_length=MAX_SITES
            )
            bundles = check.require_list(
                payload, "sealed_bundles", item_type=bytes, max_length=MAX_SITES
            )
            check.require_distinct_ids(receivers, name="receiver_ids")
            if len(receivers) != len(bundles):
                raise check.InvalidPayloadError("one sealed bundle per receiver")
            if set(receivers) != config.neighbours[site] & advertised:
                raise check.InvalidPayloadError(
                    "receivers are not exactly its advertised neighbours"
                )
            if any(len(bundle) != SEALED_SHARE_BUNDLE_BYTES for bundle in bundles):
                raise check.InvalidPayloadError("sealed bundle has the wrong length")
        except check.InvalidPayloadError as error:
            rejections.append(_reject(site, STAGE_SHARE_KEYS, str(error)))
            continue
        outgoing[site] = dict(zip(receivers, bundles, strict=True))
    shared = set(outgoing)
    share_senders = {
        site: tuple(sorted(config.neighbours[site] & shared)) for site in sorted(shared)
    }
    state = dataclasses.replace(
        state,
        stage=AWAITING_MASKED_INPUTS,
        share_senders=share_senders,
        rejections=state.rejections + tuple(rejections),
    )
    if len(shared) < config.threshold:
        return _abort(state, f"{len(shared)} sites shared keys, threshold {config.threshold}")
    requests = {}
    for site, senders in share_senders.items():
        requests[site] = tag(round_id=config.round_id, stage=STAGE_MASKED_INPUT) | {
            "sender_ids": list(senders),
            "sealed_bundles": [outgoing[sender][site] for sender in senders],
        }
    return state, requests


def server_collect_masked_inputs(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Sum the valid masked vectors (survivors U3) and ask survivors for the shares needed."""
    if state.stage != AWAITING_MASKED_INPUTS:
        return _wrong_stage(state, "collect_masked_inputs")
    config = state.config
    shared = set(state.share_senders)
    accepted, rejections = _unique_replies(replies, expected=shared, stage=STAGE_MASKED_INPUT)
    masked_sum = zeros(config.masked_length, bit_width=config.bit_width)
    survivors = []
    for site, payload in sorted(accepted.items()):
        try:
            require_tag(payload, round_id=config.round_id, stage=STAGE_MASKED_INPUT)
            vector = check.require_ring_vector(
                payload,
                "masked_input",
                length=config.masked_length,
                dtype=config.dtype,
                bit_width=config.bit_width,
            )
        except check.InvalidPayloadError as error:
            rejections.append(_reject(site, STAGE_MASKED_INPUT, str(error)))
            continue
        add_in_place(masked_sum, vector, bit_width=config.bit_width)
        survivors.append(site)
    survivor_set = set(survivors)
    dropped = tuple(sorted(shared - survivor_set))
    state = dataclasses.replace(
        state,
        stage=AWAITING_UNMASK,
        survivor_ids=tuple(survivors),
        dropped_ids=dropped,
        masked_sum=masked_sum,
        rejections=state.rejections + tuple(rejections),
    )
    if len(survivors) < config.threshold:
        return _abort(
            state, f"{len(survivors)} sites sent masked inputs, threshold {config.threshold}"
        )
    components = _survivor_components(state.share_senders, survivor_set)
    if components > 1:
        # Unmasking now would reveal the sum of each component separately (Bell et al.).
        return _abort(state, f"survivors form {components} disconnected groups in the graph")
    requests = {}
    for site in survivors:
        partners = set(state.share_senders[site])
        requests[site] = tag(round_id=config.round_id, stage=STAGE_UNMASK) | {
            "survivor_ids": sorted((partners & survivor_set) | {site}),
            "dropped_ids": sorted(partners - survivor_set),
            "num_survivors": len(survivors),
        }
    return state, requests


def server_unmask(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, DecodedAggregate | None]:
    """Rebuild the needed secrets, remove every mask and return the dequantised sum."""
    if state.stage != AWAITING_UNMASK or state.masked_sum is None:
        aborted_or_wrong, _ = _wrong_stage(state, "unmask")
        return aborted_or_wrong, None
    config = state.config
    survivors = set(state.survivor_ids)
    dropped = set(state.dropped_ids)
    accepted, rejections = _unique_replies(replies, expected=survivors, stage=STAGE_UNMASK)
    seed_shares: dict[int, dict[int, bytes]] = {site: {} for site in survivors}
    key_shares: dict[int, dict[int, bytes]] = {site: {} for site in dropped}
    responders = 0
    for holder, payload in sorted(accepted.items()):
        partners = set(state.share_senders[holder])
        try:
            require_tag(payload, round_id=config.round_id, stage=STAGE_UNMASK)
            seed_ids, seeds = _shares_field(payload, "seed_share_site_ids", "seed_shares")
            key_ids, keys = _shares_field(payload, "key_share_site_ids", "key_shares")
            if not set(seed_ids) <= (partners & survivors) | {holder}:
                raise check.InvalidPayloadError("seed shares for sites that were not asked")
            if not set(key_ids) <= partners & dropped:
                raise check.InvalidPayloadError("key shares for sites that were not asked")
        except check.InvalidPayloadError as error:
            rejections.append(_reject(holder, STAGE_UNMASK, str(error)))
            continue
        responders += 1
        x = config.share_x(holder)
        for site, share in zip(seed_ids, seeds, strict=True):
            seed_shares[site][x] = share
        for site, share in zip(key_ids, keys, strict=True):
            key_shares[site][x] = share
    state = dataclasses.replace(state, rejections=state.rejections + tuple(rejections))
    if responders < config.threshold:
        aborted, _ = _abort(
            state, f"{responders} sites answered the unmask request, threshold {config.threshold}"
        )
        return aborted, None
    total = state.masked_sum.copy()
    # Survivors' self masks come off the sum; so do the pairwise masks that survivors shared
    # with dropped sites (a survivor added +mask if its id is the lower one, -mask otherwise).
    add_seeds: list[bytes] = []
    subtract_seeds: list[bytes] = []
    try:
        for site in sorted(survivors):
            subtract_seeds.append(
                reconstruct_secret(shares=seed_shares[site], threshold=config.threshold)
            )
        for site in sorted(dropped):
            partners = sorted(set(state.share_senders[site]) & survivors)
            if not partners:
                continue
            mask_key = load_private_key(
                reconstruct_secret(shares=key_shares[site], threshold=config.threshold)
            )
            for partner in partners:
                seed = derive_pairwise_mask_seed(
                    own_private_key=mask_key,
                    peer_public_key=state.mask_public_keys[partner],
                    round_id=config.round_id,
                    session_nonce=config.session_nonce,
                    own_id=site,
                    peer_id=partner,
                )
                (subtract_seeds if partner < site else add_seeds).append(seed)
    except (ShamirError, KeyAgreementError) as error:
        aborted, _ = _abort(state, f"cannot remove masks: {error}")
        return aborted, None
    add_masks_in_place(
        total, add_seeds=add_seeds, subtract_seeds=subtract_seeds, bit_width=config.bit_width
    )
    aggregate = decode_aggregate(config=config, summed=total, num_summed=len(survivors))
    logger.info(
        "secagg round %d: summed %d sites (%d dropped after sharing keys)",
        config.round_id,
        len(survivors),
        len(dropped),
    )
    return dataclasses.replace(state, stage=FINISHED, masked_sum=None), aggregate


def _survivor_components(share_senders: Mapping[int, tuple[int, ...]], survivors: set[int]) -> int:
    """Connected components of the neighbour graph restricted to the survivors."""
    unvisited = set(survivors)
    components = 0
    while unvisited:
        components += 1
        frontier = [unvisited.pop()]
        while frontier:
            site = frontier.pop()
            for partner in share_senders[site]:
                if partner in unvisited:
                    unvisited.remove(partner)
                    frontier.append(partner)
    return components


def _shares_field(
    payload: Mapping[str, Any], ids_name: str, shares_name: str
) -> tuple[list[int], list[bytes]]:
    ids = check.require_list(payload, ids_name, item_type=int, max_length=MAX_SITES)
    shares = check.require_list(payload, shares_name, item_type=bytes, max_length=MAX_SITES)
    check.require_distinct_ids(ids, name=ids_name)
    if len(ids) != len(shares):
        raise check.InvalidPayloadError(f"{ids_name} and {shares_name} differ in length")
    if any(len(share) != SHARE_BYTES for share in shares):
        raise check.InvalidPayloadError(f"{shares_name} holds a share of the wrong length")
    return ids, shares


def _unique_replies(
    replies: Replies, *, expected: set[int], stage: str
) -> tuple[dict[int, Mapping[str, Any]], list[str]]:
    """Replies from expected sites that answered once; the rest are rejected with reasons."""
    pairs = list(replies.items()) if isinstance(replies, Mapping) else list(replies)
    counts: dict[int, int] = {}
    rejected_duplicates: set[int] = set()
    for site, _ in pairs:
        counts[site] = counts.get(site, 0) + 1
    accepted: dict[int, Mapping[str, Any]] = {}
    rejections = []
    for site, payload in pairs:
        if site not in expected:
            rejections.append(_reject(site, stage, "reply from a site that was not asked"))
        elif counts[site] > 1:
            if site not in rejected_duplicates:
                rejections.append(_reject(site, stage, "duplicated reply"))
                rejected_duplicates.add(site)
        else:
            accepted[site] = payload
    return accepted, rejections


def _reject(site: Any, stage: str, reason: str) -> str:
    message = f"site {site}: {stage} reply rejected: {reason}"
    logger.warning("secagg %s", message)
    return message


def _abort(state: ServerSecAggState, reason: str) -> tuple[ServerSecAggState, dict[int, Payload]]:
    message = f"secure aggregation aborted in round {state.config.round_id}: {reason}"
    logger.warning(message)
    return dataclasses.replace(state, stage=ABORTED, abort_reason=message, masked_sum=None), {}


def _wrong_stage(
    state: ServerSecAggState, step: str
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    if state.aborted:
        return state, {}
    return _abort(state, f"{step} called in stage {state.stage!r}")
