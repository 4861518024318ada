"""The coordinator's stages of SecAgg+, as pure functions over ``ServerSecAggState``.

Protocol: Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+; degree k < n - 1), and Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017 (k = n - 1). Each function takes the state and
the replies of one exchange and returns the new state and the requests of the next
(``{site_id: payload}``); the last returns the decoded aggregate:

- :func:`server_start_round`: fix the public round config; setup requests for all sampled
  sites (U0).
- :func:`server_collect_keys`: U1 = sites with valid public keys; fix the neighbour graph
  over U1 with k and t chosen for |U1| (``common.secagg.round_graph``); share-keys requests
  carry U1, k, t and each site's neighbours' keys. :func:`server_use_advertised_keys` does
  the same with the keys the sites advertised for this round in their last unmask replies
  (``server.secagg.advertised_keys``), so setup and share keys travel in one exchange.
- :func:`server_route_shares`: U2 = sites that sealed shares for exactly their neighbours;
  masked-input requests route each site its neighbours' sealed bundles.
- :func:`server_collect_masked_inputs`: U3 = sites with a valid masked vector (the
  survivors); their sum is accumulated; unmask requests name survivors and dropped sites.
- :func:`server_unmask`: rebuild survivors' self-mask seeds and dropped sites' mask keys from
  the shares, remove all masks, dequantise the sum and check it is in range.

Active-coordinator mode (``server_start_round(roster=...)``; Bonawitz et al. section 6,
``common.secagg.active_parameters``): the config names the roster and the corrupt and
dropout counts; :func:`server_collect_keys` keeps only keys that a distinct roster site
signed for this round, seeds the graph with their hash (``common.secagg.graph_seed``) and
sends every participant all participants' signed keys; :func:`server_collect_masked_inputs`
asks the survivors to sign the survivor set instead of unmasking, and
:func:`server_collect_consistency` forwards the signatures with the unmask request. An honest
coordinator checks everything the sites check, so that a round fails here with a reason
rather than at the sites with a refusal.

A reply that is malformed, duplicated, unexpected or for another round/stage is dropped with
a logged reason and its site counts as dropped out. The round is aborted (``state.abort_reason``
says why, later stages return nothing) when the sites still in it at any stage (U0, U1, U2,
U3) are fewer than max(t, the minimum aggregation size), when a needed secret cannot be
rebuilt from t shares, when the survivors' graph is disconnected, or when the decoded sum is
out of its range. No function raises on inbound data, and no secret is logged.

Departures from the papers: the graph is fixed after setup, over U1 (``round_graph`` says
why), and a sum is never released over fewer sites than the minimum aggregation size
(``common.secagg.aggregation_size``), which the papers' threshold t alone does not ensure.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.active_parameters import (
    ActiveGraphParameters,
    corrupt_sites,
    dropout_sites,
    minimum_active_aggregation_size,
)
from fedmm.common.secagg.aggregation_size import (
    MIN_AGGREGATION_SIZE,
    colluding_sites,
    describe_minimum,
    minimum_aggregation_size,
)
from fedmm.common.secagg.graph_seed import graph_seed
from fedmm.common.secagg.input_encoding import (
    DecodedAggregate,
    SumOutOfRangeError,
    decode_aggregate,
)
from fedmm.common.secagg.key_agreement import (
    PUBLIC_KEY_BYTES,
    PURPOSE_PAIRWISE_MASK,
    KeyAgreementError,
    derive_pairwise_mask_seed,
    load_private_key,
)
from fedmm.common.secagg.mask_expansion import add_masks_in_place
from fedmm.common.secagg.neighbour_graph import (
    DEFAULT_ADVERSARIAL_RATE,
    DEFAULT_DROPOUT_RATE,
    graph_parameters,
    threshold_for_degree,
)
from fedmm.common.secagg.protocol_stages import (
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    require_tag,
    tag,
)
from fedmm.common.secagg.ring import add_in_place, zeros
from fedmm.common.secagg.roster import SIGNATURE_BYTES, VerifiedRoster
from fedmm.common.secagg.round_binding import pair_binding, session_digest
from fedmm.common.secagg.round_config import MAX_SITES, SESSION_NONCE_BYTES, SecAggRoundConfig
from fedmm.common.secagg.round_graph import RoundGraph
from fedmm.common.secagg.round_signatures import (
    AdvertisedFor,
    SignatureError,
    survivor_set_message,
    verify_round_keys,
    verify_signed_by,
)
from fedmm.common.secagg.shamir import SHARE_BYTES, ShamirError, reconstruct_secret
from fedmm.common.secagg.share_cipher import SEALED_SHARE_BUNDLE_BYTES
from fedmm.server.secagg.advertised_keys import AdvertisedKeys

logger = logging.getLogger(__name__)

Payload = dict[str, Any]
Replies = Mapping[int, Mapping[str, Any]] | Iterable[tuple[int, Mapping[str, Any]]]

#: ``ServerSecAggState.stage`` values: the last exchange whose replies were processed.
AWAITING_KEYS = "awaiting_keys"
AWAITING_SHARES = "awaiting_shares"
AWAITING_MASKED_INPUTS = "awaiting_masked_inputs"
AWAITING_CONSISTENCY = "awaiting_consistency"
AWAITING_UNMASK = "awaiting_unmask"
FINISHED = "finished"
ABORTED = "aborted"


@dataclass(frozen=True)
class CoordinatorGraphRules:
    """How the coordinator fixes the graph after setup, and the fewest sites it sums.

    ``degree`` and ``threshold``: overrides (None: Bell et al.'s defaults for the sites that
    finished setup). A degree above |U1| - 1 means the complete graph over U1.
    ``adversarial_rate``, ``dropout_rate``: the colluding fraction of the sampled sites and
    the dropout fraction of U1 the defaults assume. ``min_sites`` and ``honest_sites``
    (distributed DP's h) feed the minimum aggregation size.
    """

    degree: int | None = None
    threshold: int | None = None
    adversarial_rate: float = DEFAULT_ADVERSARIAL_RATE
    dropout_rate: float = DEFAULT_DROPOUT_RATE
    min_sites: int = MIN_AGGREGATION_SIZE
    honest_sites: int = 0
    #: Active-coordinator mode: the verified federation roster (None: honest-but-curious).
    #: ``adversarial_rate`` is then the corrupt fraction of the roster.
    roster: VerifiedRoster | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.adversarial_rate < 1 and 0 <= self.dropout_rate < 1):
            raise ValueError("adversarial and dropout rates must be in [0, 1)")
        if self.min_sites < 2:
            raise ValueError(f"min_sites must be at least 2, got {self.min_sites}")
        if self.degree is not None and self.degree < 1:
            raise ValueError(f"degree must be at least 1, got {self.degree}")
        if self.threshold is not None and self.threshold < 2:
            raise ValueError(f"threshold must be at least 2, got {self.threshold}")
        if self.honest_sites < 0:
            raise ValueError(f"honest_sites must be >= 0, got {self.honest_sites}")

    @property
    def corrupt_sites(self) -> int:
        """Active mode: c, the corrupt sites assumed among the roster's N."""
        if self.roster is None:
            return 0
        return corrupt_sites(fraction=self.adversarial_rate, roster_size=self.roster.size)

    def min_aggregation_size(self, num_sampled: int) -> int:
        if self.roster is not None:
            return minimum_active_aggregation_size(
                corrupt=self.corrupt_sites, min_sites=self.min_sites, honest_sites=self.honest_sites
            )
        return minimum_aggregation_size(
            num_sampled=num_sampled,
            colluding_fraction=self.adversarial_rate,
            min_sites=self.min_sites,
            honest_sites=self.honest_sites,
        )

    def describe_minimum(self, num_sampled: int) -> str:
        if self.roster is not None:
            return (
                f"minimum aggregation size {self.min_aggregation_size(num_sampled)} = "
                f"max(min-sites {self.min_sites}, c + 2 = {self.corrupt_sites + 2} with c = "
                f"ceil({self.adversarial_rate:g} x {self.roster.size} roster sites)"
                + (f", {self.honest_sites} honest sites" if self.honest_sites else "")
                + ")"
            )
        return describe_minimum(
            num_sampled=num_sampled,
            colluding_fraction=self.adversarial_rate,
            min_sites=self.min_sites,
            honest_sites=self.honest_sites,
        )

    def graph_for(
        self, participants: Iterable[int], *, num_sampled: int, session_nonce: bytes
    ) -> RoundGraph:
        """The graph over ``participants`` (U1); raises ``ValueError`` if k, t cannot fit."""
        sites = tuple(sorted(participants))
        n = len(sites)
        if n < 2:
            raise ValueError("a neighbour graph needs at least two participants")
        # Colluders are counted over the sampled sites: they do not drop out at setup.
        colluding = min(
            colluding_sites(fraction=self.adversarial_rate, num_sampled=num_sampled), n - 1
        )
        if self.degree is None:
            defaults = graph_parameters(
                n, colluding=colluding, dropouts=math.ceil(self.dropout_rate * n - 1e-9)
            )
            degree, threshold = defaults.degree, defaults.threshold
        else:
            degree = min(self.degree, n - 1)
            threshold = threshold_for_degree(n, degree, colluding=colluding)
        if self.threshold is not None:
            threshold = self.threshold
        return RoundGraph(
            participant_ids=sites, degree=degree, threshold=threshold, session_nonce=session_nonce
        )


@dataclass(frozen=True, eq=False)
class ServerSecAggState:
    """The coordinator's view of one round; holds no site's plain input."""

    config: SecAggRoundConfig
    stage: str
    rules: CoordinatorGraphRules = field(default_factory=CoordinatorGraphRules)
    graph: RoundGraph | None = None
    abort_reason: str | None = None
    channel_public_keys: Mapping[int, bytes] = field(default_factory=dict)
    mask_public_keys: Mapping[int, bytes] = field(default_factory=dict)
    share_senders: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    survivor_ids: tuple[int, ...] = ()
    dropped_ids: tuple[int, ...] = ()
    masked_sum: np.ndarray | None = None
    rejections: tuple[str, ...] = ()
    #: Active mode: the participants' roster names and key signatures, and the survivors'
    #: signatures over the survivor set.
    site_names: Mapping[int, str] = field(default_factory=dict)
    key_signatures: Mapping[int, bytes] = field(default_factory=dict)
    survivor_signatures: Mapping[int, bytes] = field(default_factory=dict)

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

    @property
    def active_parameters(self) -> ActiveGraphParameters:
        """Active mode: the graph and thresholds the signed parameters give for U1."""
        if self.graph is None:
            raise ValueError("no graph yet")
        return self.config.active_graph(self.graph.num_participants)

    def too_few(self, count: int, what: str, *, threshold: int | None) -> str | None:
        """Why ``count`` sites are not enough to go on (None when they are): fewer than the
        threshold or than the minimum aggregation size."""
        num_sampled = self.config.num_sites
        needed = max(self.rules.min_aggregation_size(num_sampled), threshold or 0)
        if count >= needed:
            return None
        threshold_part = "" if threshold is None else f"threshold {threshold}; "
        return (
            f"{count} sites {what}, fewer than {needed} ({threshold_part}"
            f"{self.rules.describe_minimum(num_sampled)})"
        )


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
    min_sites: int = MIN_AGGREGATION_SIZE,
    honest_sites: int = 0,
    integer_update: bool = False,
    roster: VerifiedRoster | None = None,
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Fix the round's public config and build the setup request for every site.

    ``roster``: active-coordinator mode. The config then names the roster's digest,
    c = ceil(adversarial_rate x N) corrupt sites over the roster's N, d =
    ceil(dropout_rate x n) dropouts after setup, and ``degree`` and ``threshold`` as
    overrides (0: derived, ``common.secagg.active_parameters``).

    ``integer_update``: the sites send integer vectors in Z_(2^b) (distributed DP), summed
    as is and centred on decoding.

    ``degree`` and ``threshold`` are fixed only after setup, for the sites that finished it
    (:class:`CoordinatorGraphRules`); overrides must fit the sampled sites. ``min_sites``
    and ``honest_sites`` (distributed DP's h) feed the minimum aggregation size: a sample
    below it returns an aborted state and no request. Raises ``ValueError`` for an invalid
    configuration (a programming error, not inbound data).
    """
    sites = tuple(sorted({int(site) for site in site_ids}))
    if degree is not None and not 1 <= degree <= len(sites) - 1:
        raise ValueError(f"degree {degree} must be in [1, {len(sites) - 1}] for {len(sites)} sites")
    if threshold is not None and not 2 <= threshold <= (
        len(sites) if degree is None else degree + 1
    ):
        raise ValueError(
            f"threshold {threshold} cannot be met by {len(sites)} sites (degree {degree})"
        )
    rules = CoordinatorGraphRules(
        degree=degree,
        threshold=threshold,
        adversarial_rate=adversarial_rate,
        dropout_rate=dropout_rate,
        min_sites=min_sites,
        honest_sites=honest_sites,
        roster=roster,
    )
    metric_ranges = dict(metric_ranges or {})
    active_fields: dict[str, Any] = {}
    if roster is not None:
        active_fields = {
            "roster_digest": roster.digest,
            "corrupt_sites": rules.corrupt_sites,
            "dropout_sites": dropout_sites(fraction=dropout_rate, num_sampled=len(sites)),
            "graph_degree": degree or 0,
            "graph_threshold": threshold or 0,
        }
    names = tuple(sorted(metric_ranges))
    config = SecAggRoundConfig(
        round_id=round_id,
        session_nonce=os.urandom(SESSION_NONCE_BYTES),
        site_ids=sites,
        bit_width=bit_width,
        update_length=update_length,
        update_clip=float(update_clip),
        max_weight=max_weight,
        metric_names=names,
        metric_lower=tuple(float(metric_ranges[name][0]) for name in names),
        metric_upper=tuple(float(metric_ranges[name][1]) for name in names),
        integer_update=integer_update,
        **active_fields,
    )
    state = ServerSecAggState(config=config, stage=AWAITING_KEYS, rules=rules)
    problem = state.too_few(len(sites), "sampled", threshold=threshold)
    if problem is not None:
        return _abort(state, problem)
    logger.info(
        "secagg round %d: %d sites sampled, %d-bit ring, minimum aggregation size %d",
        round_id,
        len(sites),
        bit_width,
        rules.min_aggregation_size(len(sites)),
    )
    payload = config.to_payload() | tag(round_id=round_id, stage=STAGE_SETUP)
    return state, {site: dict(payload) for site in sites}


def server_collect_keys(
    *, state: ServerSecAggState, replies: Replies, advertised_exchange: str = ""
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Accept the advertised public keys (U1), fix the graph over U1 and send each site U1,
    the degree and threshold, and its neighbours' keys (active mode: every participant's
    signed keys, and the graph seeded by their hash).

    ``advertised_exchange`` (``train`` or ``evaluate``): the keys were advertised for this
    round in the unmask replies of an earlier one (:func:`server_use_advertised_keys`), so
    in active mode their signatures are over the roster, the exchange and the round id."""
    if state.stage != AWAITING_KEYS:
        return _wrong_stage(state, "collect_keys")
    config = state.config
    roster = state.rules.roster
    parameters_digest = config.digest() if config.active else b""
    advertised = None
    if advertised_exchange and config.active:
        advertised = AdvertisedFor(
            roster_digest=config.roster_digest,
            exchange=advertised_exchange,
            round_id=config.round_id,
        )
    accepted, rejections = _unique_replies(
        replies, expected=set(config.site_ids), stage=STAGE_SETUP
    )
    channel_keys: dict[int, bytes] = {}
    mask_keys: dict[int, bytes] = {}
    names: dict[int, str] = {}
    signatures: dict[int, bytes] = {}
    for site, payload in accepted.items():
        try:
            require_tag(payload, round_id=config.round_id, stage=STAGE_SETUP)
            channel = check.require_bytes(payload, "channel_public_key", length=PUBLIC_KEY_BYTES)
            mask = check.require_bytes(payload, "mask_public_key", length=PUBLIC_KEY_BYTES)
            if roster is not None:
                names[site] = check.require_str(payload, "site_name")
                signatures[site] = check.require_bytes(
                    payload, "key_signature", length=SIGNATURE_BYTES
                )
                verify_round_keys(
                    roster,
                    parameters_digest=parameters_digest,
                    site_id=site,
                    site_name=names[site],
                    channel_public_key=channel,
                    mask_public_key=mask,
                    signature=signatures[site],
                    advertised=advertised,
                )
        except (check.InvalidPayloadError, SignatureError) as error:
            rejections.append(_reject(site, STAGE_SETUP, str(error)))
            names.pop(site, None)
            signatures.pop(site, None)
            continue
        channel_keys[site], mask_keys[site] = channel, mask
    # A public key seen twice (within or across sites) is a replay or a copy, and a roster
    # site behind two node ids a Sybil: drop every site involved.
    owners: dict[bytes, set[int]] = {}
    for site in channel_keys:
        for key in (channel_keys[site], mask_keys[site]):
            owners.setdefault(key, set()).add(site)
    name_owners: dict[str, set[int]] = {}
    for site, name in names.items():
        name_owners.setdefault(name, set()).add(site)
    copied = set()
    for site in channel_keys:
        if (
            channel_keys[site] == mask_keys[site]
            or any(len(owners[key]) > 1 for key in (channel_keys[site], mask_keys[site]))
            or (site in names and len(name_owners[names[site]]) > 1)
        ):
            copied.add(site)
    for site in sorted(copied):
        rejections.append(_reject(site, STAGE_SETUP, "public key or roster name repeated"))
        del channel_keys[site], mask_keys[site]
        names.pop(site, None)
        signatures.pop(site, None)
    state = dataclasses.replace(
        state,
        stage=AWAITING_SHARES,
        channel_public_keys=channel_keys,
        mask_public_keys=mask_keys,
        site_names=names,
        key_signatures=signatures,
        rejections=state.rejections + tuple(rejections),
    )
    threshold = None if config.active else state.rules.threshold
    problem = state.too_few(len(mask_keys), "advertised keys", threshold=threshold)
    if problem is not None:
        return _abort(state, problem)
    try:
        if config.active:
            graph = _active_graph(state)
        else:
            graph = state.rules.graph_for(
                mask_keys, num_sampled=config.num_sites, session_nonce=config.session_nonce
            )
    except ValueError as error:
        return _abort(state, f"cannot fix the neighbour graph for {len(mask_keys)} sites: {error}")
    state = dataclasses.replace(state, graph=graph)
    logger.info(
        "secagg round %d: %d of %d sites finished setup; degree %d, threshold %d",
        config.round_id,
        graph.num_participants,
        config.num_sites,
        graph.degree,
        graph.threshold,
    )
    requests = {}
    if config.active:
        everyone = list(graph.participant_ids)
        signed_keys = {
            "site_ids": everyone,
            "participant_names": [names[site] for site in everyone],
            "channel_public_keys": [channel_keys[site] for site in everyone],
            "mask_public_keys": [mask_keys[site] for site in everyone],
            "key_signatures": [signatures[site] for site in everyone],
        }
    for site in graph.participant_ids:
        if config.active:
            keys = dict(signed_keys)
        else:
            peers = sorted(graph.neighbours[site])
            keys = {
                "site_ids": peers,
                "channel_public_keys": [channel_keys[peer] for peer in peers],
                "mask_public_keys": [mask_keys[peer] for peer in peers],
            }
        requests[site] = (
            tag(round_id=config.round_id, stage=STAGE_SHARE_KEYS) | graph.to_payload() | keys
        )
    return state, requests


def server_use_advertised_keys(
    *, state: ServerSecAggState, keys: Mapping[int, AdvertisedKeys], exchange: str
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Skip setup: take the keys the sampled sites advertised for this round (in the unmask
    replies of their last round of ``exchange``) as their setup replies, fix the graph and
    build the share-keys requests, exactly as :func:`server_collect_keys` does with keys
    from setup. Each request then travels with the round config and the task, in one
    exchange (``secagg_setup_share``). Keys for another round are not accepted."""
    replies = {
        site: tag(round_id=state.config.round_id, stage=STAGE_SETUP) | advertised.setup_payload()
        for site, advertised in keys.items()
        if advertised.round_id == state.config.round_id
    }
    return server_collect_keys(state=state, replies=replies, advertised_exchange=exchange)


def _active_graph(state: ServerSecAggState) -> RoundGraph:
    """Active mode: the graph over U1 from the signed parameters, seeded by the keys' hash."""
    config = state.config
    participants = tuple(sorted(state.mask_public_keys))
    parameters = config.active_graph(len(participants))
    seed = graph_seed(
        parameters_digest=config.digest(),
        participant_ids=participants,
        names=state.site_names,
        channel_public_keys=state.channel_public_keys,
        mask_public_keys=state.mask_public_keys,
    )
    return RoundGraph(
        participant_ids=participants,
        degree=parameters.degree,
        threshold=parameters.threshold,
        session_nonce=config.session_nonce,
        seed=seed,
    )


def server_route_shares(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Accept sealed share bundles (U2) and route each site the bundles addressed to it."""
    if state.stage != AWAITING_SHARES or state.graph is None:
        return _wrong_stage(state, "route_shares")
    config, graph = state.config, state.graph
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
            if set(receivers) != graph.neighbours[site]:
                raise check.InvalidPayloadError("receivers are not exactly its neighbours")
            if any(len(bundle) != SEALED_SHARE_BUNDLE_BYTES for bundle in bundles):
                raise check.InvalidPayloadError("sealed bundle has the wrong length")
        except check.InvalidPayloadError as error:
            rejections.append(_reject(site, STAGE_SHARE_KEYS, str(error)))
            continue
        outgoing[site] = dict(zip(receivers, bundles, strict=True))
    shared = set(outgoing)
    share_senders = {
        site: tuple(sorted(graph.neighbours[site] & shared)) for site in sorted(shared)
    }
    state = dataclasses.replace(
        state,
        stage=AWAITING_MASKED_INPUTS,
        share_senders=share_senders,
        rejections=state.rejections + tuple(rejections),
    )
    problem = state.too_few(len(shared), "shared keys", threshold=graph.threshold)
    if problem is None and config.active:
        problem = _beyond_dropout_allowance(state, len(shared), "shared keys")
    if problem is not None:
        return _abort(state, problem)
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
    if state.stage != AWAITING_MASKED_INPUTS or state.graph is None:
        return _wrong_stage(state, "collect_masked_inputs")
    config, graph = state.config, state.graph
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
    problem = state.too_few(len(survivors), "sent masked inputs", threshold=graph.threshold)
    if problem is None and config.active:
        problem = _beyond_dropout_allowance(state, len(survivors), "sent masked inputs")
        needed = state.active_parameters.consistency_threshold
        if problem is None and len(survivors) < needed:
            problem = (
                f"{len(survivors)} sites sent masked inputs, fewer than the {needed} "
                "signatures the consistency check needs"
            )
    if problem is not None:
        return _abort(state, f"{problem}; round discarded before unmasking")
    components = _survivor_components(state.share_senders, survivor_set)
    if components > 1:
        # Unmasking now would reveal the sum of each component separately (Bell et al.).
        return _abort(state, f"survivors form {components} disconnected groups in the graph")
    if config.active:  # first the survivors sign the survivor set (consistency check)
        request = tag(round_id=config.round_id, stage=STAGE_CONSISTENCY) | {
            "survivor_ids": sorted(survivors)
        }
        state = dataclasses.replace(state, stage=AWAITING_CONSISTENCY)
        return state, {site: dict(request) for site in survivors}
    requests = {}
    for site in survivors:
        partners = set(state.share_senders[site])
        requests[site] = tag(round_id=config.round_id, stage=STAGE_UNMASK) | {
            "survivor_ids": sorted((partners & survivor_set) | {site}),
            "dropped_ids": sorted(partners - survivor_set),
            "num_survivors": len(survivors),
        }
    return state, requests


def server_collect_consistency(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, dict[int, Payload]]:
    """Active mode: keep the survivors' valid signatures over the survivor set and send them,
    with the unmask request, to every survivor that signed. Aborts below t_cc signatures:
    no honest site would unmask."""
    if state.stage != AWAITING_CONSISTENCY or state.graph is None:
        return _wrong_stage(state, "collect_consistency")
    config, graph = state.config, state.graph
    roster = state.rules.roster
    survivors = set(state.survivor_ids)
    accepted, rejections = _unique_replies(replies, expected=survivors, stage=STAGE_CONSISTENCY)
    message = survivor_set_message(
        parameters_digest=config.digest(),
        graph_digest=graph.digest(),
        survivor_ids=state.survivor_ids,
    )
    signatures: dict[int, bytes] = {}
    for site, payload in sorted(accepted.items()):
        try:
            require_tag(payload, round_id=config.round_id, stage=STAGE_CONSISTENCY)
            signature = check.require_bytes(payload, "survivor_signature", length=SIGNATURE_BYTES)
            if roster is None:
                raise check.InvalidPayloadError("no roster to verify the signature")
            verify_signed_by(
                roster, site_name=state.site_names[site], message=message, signature=signature
            )
        except (check.InvalidPayloadError, SignatureError) as error:
            rejections.append(_reject(site, STAGE_CONSISTENCY, str(error)))
            continue
        signatures[site] = signature
    state = dataclasses.replace(
        state,
        stage=AWAITING_UNMASK,
        survivor_signatures=signatures,
        rejections=state.rejections + tuple(rejections),
    )
    needed = state.active_parameters.consistency_threshold
    if len(signatures) < needed:
        return _abort(
            state,
            f"{len(signatures)} survivors signed the survivor set, fewer than the {needed} the "
            "consistency check needs; round discarded before unmasking",
        )
    signers = sorted(signatures)
    request = tag(round_id=config.round_id, stage=STAGE_UNMASK) | {
        "signer_ids": signers,
        "survivor_signatures": [signatures[site] for site in signers],
    }
    return state, {site: dict(request) for site in signers}


def server_unmask(
    *, state: ServerSecAggState, replies: Replies
) -> tuple[ServerSecAggState, DecodedAggregate | None]:
    """Rebuild the needed secrets, remove every mask and return the dequantised sum."""
    if state.stage != AWAITING_UNMASK or state.masked_sum is None or state.graph is None:
        aborted_or_wrong, _ = _wrong_stage(state, "unmask")
        return aborted_or_wrong, None
    config, threshold = state.config, state.graph.threshold
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
    if responders < threshold:
        aborted, _ = _abort(
            state, f"{responders} sites answered the unmask request, threshold {threshold}"
        )
        return aborted, None
    total = state.masked_sum.copy()
    # Survivors' self masks come off the sum; so do the pairwise masks that survivors shared
    # with dropped sites (a survivor added +mask if its id is the lower one, -mask otherwise).
    add_seeds: list[bytes] = []
    subtract_seeds: list[bytes] = []
    try:
        for site in sorted(survivors):
            subtract_seeds.append(reconstruct_secret(shares=seed_shares[site], threshold=threshold))
        for site in sorted(dropped):
            partners = sorted(set(state.share_senders[site]) & survivors)
            if not partners:
                continue
            mask_key = load_private_key(
                reconstruct_secret(shares=key_shares[site], threshold=threshold)
            )
            for partner in partners:
                seed = derive_pairwise_mask_seed(
                    own_private_key=mask_key,
                    peer_public_key=state.mask_public_keys[partner],
                    round_id=config.round_id,
                    session_nonce=config.session_nonce,
                    own_id=site,
                    peer_id=partner,
                    binding=_mask_binding(state, site, partner),
                )
                (subtract_seeds if partner < site else add_seeds).append(seed)
    except (ShamirError, KeyAgreementError) as error:
        aborted, _ = _abort(state, f"cannot remove masks: {error}")
        return aborted, None
    add_masks_in_place(
        total, add_seeds=add_seeds, subtract_seeds=subtract_seeds, bit_width=config.bit_width
    )
    try:
        aggregate = decode_aggregate(config=config, summed=total, num_summed=len(survivors))
    except SumOutOfRangeError as error:
        aborted, _ = _abort(state, f"decoded sum out of range: {error}; round discarded")
        return aborted, None
    logger.info(
        "secagg round %d: summed %d sites (%d dropped after sharing keys)",
        config.round_id,
        len(survivors),
        len(dropped),
    )
    return dataclasses.replace(state, stage=FINISHED, masked_sum=None), aggregate


def _mask_binding(state: ServerSecAggState, site: int, partner: int) -> bytes:
    """Active mode: what the pairwise mask of two sites is bound to (empty otherwise)."""
    if not state.config.active or state.graph is None:
        return b""
    return pair_binding(
        session=session_digest(
            parameters_digest=state.config.digest(), graph_digest=state.graph.digest()
        ),
        purpose=PURPOSE_PAIRWISE_MASK,
        site_a=site,
        public_key_a=state.mask_public_keys[site],
        site_b=partner,
        public_key_b=state.mask_public_keys[partner],
    )


def _beyond_dropout_allowance(state: ServerSecAggState, count: int, what: str) -> str | None:
    """Active mode: why ``count`` sites left of U1 are too few for the dropout allowance."""
    parameters = state.active_parameters
    missing = parameters.num_participants - count
    if missing <= parameters.dropout_allowance:
        return None
    return (
        f"{count} of {parameters.num_participants} participants {what}: {missing} dropped, "
        f"more than the {parameters.dropout_allowance} the round allows"
    )


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
