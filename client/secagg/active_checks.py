"""The site's checks in active-coordinator mode, one function per stage.

Against a coordinator that lies, substitutes or replays keys, forges survivor sets or picks
the graph (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, section 6; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020), an honest site believes only what the roster's sites
signed and what it can recompute itself:

- setup (:func:`check_active_setup`): the round names the roster this site pinned, assumes
  at least as many corrupt sites as this site does, and samples enough sites;
- share keys (:func:`verified_share_keys`): every participant's two round keys are signed by
  a distinct roster site for exactly this round's parameters and node id; the graph is drawn
  from the hash of those keys (``common.secagg.graph_seed``), with the degree and threshold
  the signed parameters give (``common.secagg.active_parameters``);
- masked input (:func:`check_partners`): enough neighbours sent shares;
- consistency (:func:`check_survivor_set`): the survivor set is a subset of the participants
  that misses at most the allowed dropouts and is large enough;
- unmask (:func:`check_survivor_signatures`): enough survivors signed that same set.

Each check raises ``SecAggRefusal`` with a code (``UNAUTHENTICATED`` for anything unsigned,
unknown or forged) and a reason for the site's log; no secret is ever in a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmm.client.secagg.aggregation_floor import TooFewSites
from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.client.secagg.site_identity import SiteIdentity
from fedmm.common.secagg import payload_validation as check
from fedmm.common.secagg.active_parameters import (
    ActiveGraphParameters,
    minimum_active_aggregation_size,
)
from fedmm.common.secagg.graph_seed import graph_seed
from fedmm.common.secagg.key_agreement import PUBLIC_KEY_BYTES
from fedmm.common.secagg.roster import SIGNATURE_BYTES
from fedmm.common.secagg.round_config import MAX_SITES, SecAggRoundConfig
from fedmm.common.secagg.round_graph import RoundGraph
from fedmm.common.secagg.round_signatures import (
    AdvertisedFor,
    SignatureError,
    count_survivor_set_signatures,
    verify_round_keys,
)
from fedmm.common.site_refusal import RefusalCode


@dataclass(frozen=True)
class VerifiedShareKeys:
    """The share-keys request of an active round, once every signature checked out."""

    graph: RoundGraph
    parameters: ActiveGraphParameters
    names: dict[int, str]
    channel_public_keys: dict[int, bytes]
    mask_public_keys: dict[int, bytes]


def unauthenticated(message: str) -> SecAggRefusal:
    return SecAggRefusal(message, code=RefusalCode.UNAUTHENTICATED)


def require_identity(identity: SiteIdentity | None) -> SiteIdentity:
    """The site's roster identity; a refusal when the site has none configured."""
    if identity is None:
        raise SecAggRefusal(
            "the round runs in active-coordinator mode but this site has no roster and "
            "signing key configured",
            code=RefusalCode.SECAGG_POLICY,
        )
    return identity


def require_active_floor(
    config: SecAggRoundConfig,
    policy: ClientSecAggPolicy,
    count: int,
    *,
    what: str,
    honest_sites: int = 0,
) -> None:
    """Raise ``TooFewSites`` when ``count`` sites are fewer than max(min-sites, c + 2, h),
    with c the corrupt sites the round assumes (at least this site's own c, checked at
    setup)."""
    minimum = minimum_active_aggregation_size(
        corrupt=config.corrupt_sites, min_sites=policy.min_sites, honest_sites=honest_sites
    )
    if count < minimum:
        raise TooFewSites(
            f"{count} {what}, fewer than this site's minimum aggregation size {minimum} = "
            f"max(min-sites {policy.min_sites}, c + 2 = {config.corrupt_sites + 2}"
            + (f", {honest_sites} honest sites assumed by distributed DP" if honest_sites else "")
            + "); refusing to go on"
        )


def check_active_setup(
    config: SecAggRoundConfig, policy: ClientSecAggPolicy, identity: SiteIdentity | None
) -> SiteIdentity:
    """Setup: the roster is this site's pinned one, the round assumes at least this site's
    corrupt count, and enough sites are sampled. Returns the identity to sign with."""
    identity = require_identity(identity)
    pinned = policy.pinned_roster_digest
    if pinned is not None and pinned != identity.roster.digest:
        raise SecAggRefusal(
            "this site's roster file is not the roster its policy pins (roster-digest)",
            code=RefusalCode.SECAGG_POLICY,
        )
    if config.roster_digest != identity.roster.digest:
        raise unauthenticated(
            "setup request names a roster other than the one this site pinned: refusing"
        )
    needed = policy.corrupt_sites(identity.roster.size)
    if config.corrupt_sites < needed:
        raise SecAggRefusal(
            f"the round assumes {config.corrupt_sites} corrupt sites; this site assumes "
            f"{needed} of the {identity.roster.size} in the roster (colluding-fraction "
            f"{policy.colluding_fraction:g})",
            code=RefusalCode.SECAGG_POLICY,
        )
    if config.graph_degree > policy.max_degree:
        raise SecAggRefusal(
            f"degree {config.graph_degree} exceeds this site's max-degree {policy.max_degree}",
            code=RefusalCode.SECAGG_POLICY,
        )
    require_active_floor(config, policy, config.num_sites, what="sites sampled for the round")
    return identity


def verified_share_keys(
    *,
    config: SecAggRoundConfig,
    policy: ClientSecAggPolicy,
    identity: SiteIdentity,
    request: Mapping[str, Any],
    site_id: int,
    own_channel_public_key: bytes,
    own_mask_public_key: bytes,
    advertised_exchange: str = "",
) -> VerifiedShareKeys:
    """Share keys: verify every participant's signed round keys and derive the graph.

    ``advertised_exchange``: the keys were advertised for this round of that exchange in an
    earlier round's unmask replies and are signed over the roster, the exchange and this
    round's id (``round_signatures.advertised_keys_message``), not its parameters."""
    try:
        participants = check.require_list(
            request, "participant_ids", item_type=int, max_length=MAX_SITES
        )
        degree = check.require_int(request, "degree", minimum=1, maximum=MAX_SITES)
        threshold = check.require_int(request, "threshold", minimum=2, maximum=MAX_SITES)
        listed = check.require_list(request, "site_ids", item_type=int, max_length=MAX_SITES)
        names = check.require_list(
            request, "participant_names", item_type=str, max_length=MAX_SITES
        )
        channel_keys = check.require_list(
            request, "channel_public_keys", item_type=bytes, max_length=MAX_SITES
        )
        mask_keys = check.require_list(
            request, "mask_public_keys", item_type=bytes, max_length=MAX_SITES
        )
        signatures = check.require_list(
            request, "key_signatures", item_type=bytes, max_length=MAX_SITES
        )
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"share-keys request rejected: {error}") from None
    if participants != sorted(set(participants)) or listed != participants:
        raise SecAggRefusal("share-keys request: keys must list every participant, in id order")
    if (
        not len(participants)
        == len(names)
        == len(channel_keys)
        == len(mask_keys)
        == len(signatures)
    ):
        raise SecAggRefusal("share-keys request: one name, two keys and a signature per site")
    if site_id not in participants:
        raise SecAggRefusal("share-keys request does not list this site among the participants")
    strangers = set(participants) - set(config.site_ids)
    if strangers:
        raise SecAggRefusal(f"share-keys request names {len(strangers)} sites not sampled")
    if len(set(names)) != len(names):
        raise unauthenticated("share-keys request: one roster site stands behind two node ids")
    if any(len(key) != PUBLIC_KEY_BYTES for key in channel_keys + mask_keys):
        raise SecAggRefusal(f"public keys must be {PUBLIC_KEY_BYTES} bytes")
    if len(set(channel_keys + mask_keys)) != 2 * len(participants):
        raise unauthenticated("share-keys request repeats a public key")
    if any(len(signature) != SIGNATURE_BYTES for signature in signatures):
        raise unauthenticated(f"key signatures must be {SIGNATURE_BYTES} bytes")
    parameters_digest = config.digest()
    advertised = None
    if advertised_exchange:
        advertised = AdvertisedFor(
            roster_digest=config.roster_digest,
            exchange=advertised_exchange,
            round_id=config.round_id,
        )
    for site, name, channel, mask, signature in zip(
        participants, names, channel_keys, mask_keys, signatures, strict=True
    ):
        if site == site_id and (
            name != identity.name
            or channel != own_channel_public_key
            or mask != own_mask_public_key
        ):
            raise unauthenticated("share-keys request misstates this site's own round keys")
        try:
            verify_round_keys(
                identity.roster,
                parameters_digest=parameters_digest,
                site_id=site,
                site_name=name,
                channel_public_key=channel,
                mask_public_key=mask,
                signature=signature,
                advertised=advertised,
            )
        except SignatureError as error:
            raise unauthenticated(
                f"share-keys request: round keys of site {site} are not signed for this round "
                f"by a roster site ({error})"
            ) from None
    by_site = {
        "names": dict(zip(participants, names, strict=True)),
        "channel": dict(zip(participants, channel_keys, strict=True)),
        "mask": dict(zip(participants, mask_keys, strict=True)),
    }
    try:
        parameters = config.active_graph(len(participants))
    except ValueError as error:
        raise SecAggRefusal(f"share-keys request: no safe graph: {error}") from None
    if (degree, threshold) != (parameters.degree, parameters.threshold):
        raise SecAggRefusal(
            f"share-keys request: degree {degree} and threshold {threshold} differ from the "
            f"{parameters.degree} and {parameters.threshold} the round's signed parameters "
            f"give for {len(participants)} participants"
        )
    seed = graph_seed(
        parameters_digest=parameters_digest,
        participant_ids=tuple(participants),
        names=by_site["names"],
        channel_public_keys=by_site["channel"],
        mask_public_keys=by_site["mask"],
    )
    graph = RoundGraph(
        participant_ids=tuple(participants),
        degree=parameters.degree,
        threshold=parameters.threshold,
        session_nonce=config.session_nonce,
        seed=seed,
    )
    return VerifiedShareKeys(
        graph=graph,
        parameters=parameters,
        names=by_site["names"],
        channel_public_keys=by_site["channel"],
        mask_public_keys=by_site["mask"],
    )


def check_active_graph_policy(
    parameters: ActiveGraphParameters, policy: ClientSecAggPolicy
) -> None:
    """The derived graph within this site's own caps (max-degree, min-threshold)."""
    if parameters.degree > policy.max_degree:
        raise SecAggRefusal(
            f"degree {parameters.degree} exceeds this site's max-degree {policy.max_degree}",
            code=RefusalCode.SECAGG_POLICY,
        )
    if parameters.threshold < policy.min_threshold:
        raise SecAggRefusal(
            f"threshold {parameters.threshold} is below this site's min-threshold "
            f"{policy.min_threshold}",
            code=RefusalCode.SECAGG_POLICY,
        )


def check_partners(parameters: ActiveGraphParameters, partners: Sequence[int]) -> None:
    """Masked input: at least k - D neighbours sent shares, so at least k - D - c honest
    partners, more than the D the coordinator may later call dropped."""
    if len(partners) < parameters.required_partners:
        raise SecAggRefusal(
            f"shares from {len(partners)} of {parameters.degree} neighbours; the round allows "
            f"{parameters.dropout_allowance} missing, so at least "
            f"{parameters.required_partners} are needed"
        )


def check_survivor_set(
    *,
    config: SecAggRoundConfig,
    policy: ClientSecAggPolicy,
    parameters: ActiveGraphParameters,
    graph: RoundGraph,
    site_id: int,
    survivors: Sequence[int],
    honest_sites: int = 0,
) -> None:
    """Consistency: the survivor set this site is asked to sign is plausible and safe."""
    if list(survivors) != sorted(set(survivors)):
        raise SecAggRefusal("consistency request: survivor ids must be distinct and sorted")
    strangers = set(survivors) - set(graph.participant_ids)
    if strangers:
        raise SecAggRefusal(
            f"consistency request names {len(strangers)} survivors that are not participants"
        )
    if site_id not in survivors:
        raise SecAggRefusal("consistency request does not list this site as a survivor")
    missing = graph.num_participants - len(survivors)
    if missing > parameters.dropout_allowance:
        raise SecAggRefusal(
            f"consistency request calls {missing} of {graph.num_participants} participants "
            f"dropped; the round allows {parameters.dropout_allowance}"
        )
    require_active_floor(
        config, policy, len(survivors), what="sites survived", honest_sites=honest_sites
    )
    if len(survivors) < parameters.consistency_threshold:
        raise SecAggRefusal(
            f"{len(survivors)} survivors cannot give the {parameters.consistency_threshold} "
            "signatures the consistency check needs"
        )


def check_survivor_signatures(
    *,
    identity: SiteIdentity,
    config: SecAggRoundConfig,
    graph: RoundGraph,
    parameters: ActiveGraphParameters,
    names: Mapping[int, str],
    survivors: Sequence[int],
    request: Mapping[str, Any],
) -> None:
    """Unmask: at least t_cc distinct survivors signed the very set this site signed."""
    try:
        signer_ids = check.require_list(request, "signer_ids", item_type=int, max_length=MAX_SITES)
        signatures = check.require_list(
            request, "survivor_signatures", item_type=bytes, max_length=MAX_SITES
        )
    except check.InvalidPayloadError as error:
        raise SecAggRefusal(f"unmask request rejected: {error}") from None
    if len(signer_ids) != len(signatures):
        raise SecAggRefusal("unmask request: one signature per signer")
    valid = count_survivor_set_signatures(
        identity.roster,
        parameters_digest=config.digest(),
        graph_digest=graph.digest(),
        survivor_ids=survivors,
        names=names,
        signer_ids=signer_ids,
        signatures=signatures,
    )
    if valid < parameters.consistency_threshold:
        raise unauthenticated(
            f"only {valid} survivors signed the survivor set this site signed; "
            f"{parameters.consistency_threshold} are needed: the coordinator may have shown "
            "sites different survivor sets. Refusing to unmask"
        )
