"""The site's SecAgg+ message glue: Flower messages in, ``client.secagg.stages`` calls out.

SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017), four custom actions
(``common.secure_round``): setup trains and advertises keys; share keys, masked input and
unmask call ``client.secagg.stages``. Unmask also makes the fresh key pairs of the round the
request names and advertises their public keys (``client.secagg.next_round_keys``; the
private keys wait in ``context.state``); a round whose sites all did opens with setup and
share keys in one exchange (``run_secagg_setup_share``), which uses them once. In
active-coordinator mode (the round config names a roster; Bonawitz et al., section 6) the
site's roster identity
(``client.secagg.site_identity``: the roster file and signing key its node config names,
checked against the digest its policy pins) signs and verifies at setup, share keys, the
fifth exchange, consistency, and unmask. The trained update waits, encoded into the round's
ring, in a node-private file (``client.secagg.pending_update``), never in ``context.state``;
the protocol state there is small and tagged with round and stage, so a late or replayed
message is refused with a reason instead of crashing the handler. No torch here: a deployed
site may run the stages after setup in a freshly started runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmm.client.policy_file import PolicyError
from fedmm.client.secagg import active_checks
from fedmm.client.secagg.aggregation_floor import TooFewSites
from fedmm.client.secagg.next_round_keys import (
    NextRoundKeys,
    advertise_next_round_keys,
    claim_next_round_keys,
)
from fedmm.client.secagg.pending_update import (
    PendingUpdate,
    discard_pending_updates,
    load_pending_update,
    node_spill_dir,
    save_pending_update,
)
from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.client.secagg.site_identity import SiteIdentity, identity_from_node_config
from fedmm.client.secagg.site_signing_key import SiteSigningKeyError
from fedmm.client.secagg.stages import (
    ClientSecAggState,
    client_consistency,
    client_masked_encoded_input,
    client_setup,
    client_share_keys,
    client_state_from_record,
    client_state_to_record,
    client_unmask,
)
from fedmm.client.site_replies import refuse
from fedmm.common.secagg.input_encoding import encode_site_input
from fedmm.common.secagg.protocol_stages import STAGE_MASKED_INPUT, STAGE_SHARE_KEYS, require_tag
from fedmm.common.secagg.quantisation import new_rounding_generator
from fedmm.common.secagg.roster import RosterError
from fedmm.common.secure_round import (
    RECORD_MASKED,
    RECORD_PRIVACY,
    RECORD_SECAGG,
    RECORD_SECAGG_SHARE,
    RECORD_STATUS,
    reported_epsilon,
    weighted_metrics,
)
from fedmm.common.site_refusal import RefusalCode, SiteRefusal, status_payload
from fedmm.common.site_task import RECORD_ARRAYS, RECORD_CONFIG

logger = logging.getLogger(__name__)

SECAGG_STATE_KEY = "secagg"  # this round's protocol state (keys, shares; small)
SECAGG_LAST_ROUND_KEY = "secagg-last-round"  # the last round this site took part in
#: The last evaluation round this site took part in (evaluation's sums have their own rounds).
SECAGG_LAST_EVALUATION_KEY = "secagg-last-round-evaluate"
SECAGG_SPILL_KEY = "secagg-spill"  # this node's private directory for waiting updates
#: The key pairs this site advertised for its next round (one per exchange: train, evaluate).
SECAGG_NEXT_KEYS_KEY = "secagg-next-keys"


@dataclass(frozen=True)
class SiteContribution:
    """What a site puts into one secure sum: the result of the task its setup request
    declares (``client.site_tasks``)."""

    #: Flat, in the global arrays' order: a model update (reals, clipped and quantised
    #: here), or distributed DP's integers in Z_(2^b) (unsigned).
    vector: np.ndarray
    weight: int  # the site's public (noisy) record count: its weight in the sum
    #: Per-record values of the round's summed metrics; each is summed as weight * value.
    metrics: Mapping[str, float]
    epsilon_bound: float  # the bound the site commits to, not its exact spend
    #: Distributed DP: the honest sites whose noise shares this site assumes in every sum
    #: (h); the site then refuses to go on with fewer (``client.secagg.aggregation_floor``).
    honest_sites: int = 0


#: A task's computation at setup: (setup message, context) -> its contribution, or a refusal.
Contributor = Callable[[Message, Context], "SiteContribution | SiteRefusal"]


def secagg_share(msg: Message, context: Context) -> Message:
    try:
        state, request = _stage_input(msg, context)
        state, reply = client_share_keys(
            state=state, request=request, identity=_round_identity(state, context)
        )
    except (ValueError, KeyError) as refusal:
        return refuse(msg, _as_refusal(refusal))
    _store_state(context, state)
    return _secagg_reply(msg, reply)


def secagg_masked(msg: Message, context: Context) -> Message:
    try:
        state, request = _stage_input(msg, context)
        if state.stage != STAGE_SHARE_KEYS:
            raise SecAggRefusal(
                f"masked-input request out of order (last stage {state.stage!r})",
                code=RefusalCode.OUT_OF_ORDER,
            )
        require_tag(request, round_id=state.config.round_id, stage=STAGE_MASKED_INPUT)
        record = context.state.config_records[SECAGG_STATE_KEY]
        pending = load_pending_update(
            Path(str(record["pending-file"])), round_id=state.config.round_id
        )
        state, reply = client_masked_encoded_input(
            state=state, request=request, encoded_input=pending.encoded
        )
    except (ValueError, KeyError) as refusal:  # refusals, stale state, unusable local input
        return refuse(msg, _as_refusal(refusal))
    # Masked: the plain update is no longer needed, nor (when empty) its directory.
    pending_file = Path(str(record["pending-file"]))
    pending_file.unlink(missing_ok=True)
    _release_spill_dir(context, pending_file.parent)
    _store_state(context, state)
    masked = reply.pop("masked_input")
    out = _secagg_reply(msg, reply)
    out.content.array_records[RECORD_MASKED] = ArrayRecord([masked])
    return out


def _signed_stage(
    msg: Message, context: Context, stage: Callable[..., tuple[ClientSecAggState, dict]]
) -> tuple[ClientSecAggState, dict] | Message:
    """Run ``stage`` (consistency or unmask) on this round's state: its new state and reply,
    or the refusal to send. Below this site's minimum the round is dead here: its state is
    dropped."""
    try:
        state, request = _stage_input(msg, context)
        return stage(state=state, request=request, identity=_round_identity(state, context))
    except TooFewSites as refusal:
        context.state.config_records.pop(SECAGG_STATE_KEY, None)
        return refuse(msg, refusal.refusal())
    except (ValueError, KeyError) as refusal:
        return refuse(msg, _as_refusal(refusal))


def secagg_consistency(msg: Message, context: Context) -> Message:
    """Active mode: sign the survivor set (once a round)."""
    result = _signed_stage(msg, context, client_consistency)
    if isinstance(result, Message):
        return result
    state, reply = result
    _store_state(context, state)
    return _secagg_reply(msg, reply)


def secagg_unmask(msg: Message, context: Context) -> Message:
    result = _signed_stage(msg, context, client_unmask)
    if isinstance(result, Message):
        return result
    state, reply = result
    # Unmasking runs once per round: drop the state (and its secrets) now, so a second
    # request for the other secret of a site finds nothing to answer from.
    del context.state.config_records[SECAGG_STATE_KEY]
    return _secagg_reply(msg, reply | _advertise_next_round_keys(msg, context, state))


def exchange_of(msg: Message) -> str:
    """The exchange a message belongs to: ``evaluate`` (``evaluate.*``) or ``train``. A
    training round and an evaluation after it share the round number: each kind keeps its
    own replay guard, and a stage message of the other kind is refused."""
    return "evaluate" if msg.metadata.message_type.split(".")[0] == "evaluate" else "train"


def _last_round_key(exchange: str) -> str:
    return SECAGG_LAST_EVALUATION_KEY if exchange == "evaluate" else SECAGG_LAST_ROUND_KEY


def run_secagg_setup(
    msg: Message,
    context: Context,
    *,
    contribute: Contributor,
    integer_vector: bool,
    result_length: int | None = None,
) -> Message:
    """Check the round config, compute the task's result with ``contribute``, keep it
    waiting, advertise keys. ``result_length``: the entries of the task's vector (None: the
    global model's, an update).

    Everything that can be checked before the task runs is: the round config against the
    site's policy, the vector length against the global arrays, and (``integer_vector``)
    the kind of vector the round expects; a bad request costs no privacy budget. The round
    is marked as this site's last before the task runs, so a replayed setup never trains
    twice. Keys this site advertised for the round earlier are discarded: the round runs
    setup, with fresh keys.
    """
    started = _start_round(
        msg,
        context,
        integer_vector=integer_vector,
        result_length=result_length,
        with_advertised_keys=False,
    )
    if isinstance(started, Message):
        return started
    state, reply = started
    return _contribute_and_reply(msg, context, state, reply, contribute=contribute)


def run_secagg_setup_share(
    msg: Message,
    context: Context,
    *,
    contribute: Contributor,
    integer_vector: bool,
    result_length: int | None = None,
) -> Message:
    """Setup and share keys in one exchange, with the key pairs this site advertised for the
    round in its last unmask reply (``client.secagg.next_round_keys``): check the round
    config (record ``secagg``) and the graph and neighbours' keys (record ``secagg_share``),
    seal the shares, then compute the task's result, keep it waiting and send the sealed
    shares. Every check runs before the task, so a bad request costs no privacy budget.

    The advertised keys are taken out of the node state first: they serve this round once,
    and are refused for any other round. A site without them (never made, lost, or made for
    another round) refuses; the coordinator then counts it as a dropout of this round, and
    it takes part through setup in the next one.
    """
    started = _start_round(
        msg,
        context,
        integer_vector=integer_vector,
        result_length=result_length,
        with_advertised_keys=True,
    )
    if isinstance(started, Message):
        return started
    state, _setup_reply = started
    try:
        share_request = dict(msg.content.config_records[RECORD_SECAGG_SHARE])
        state, reply = client_share_keys(
            state=state,
            request=share_request,
            identity=_round_identity(state, context),
            advertised_exchange=exchange_of(msg),
        )
    except (ValueError, KeyError) as refusal:
        return refuse(msg, _as_refusal(refusal))
    return _contribute_and_reply(msg, context, state, reply, contribute=contribute)


def _start_round(
    msg: Message,
    context: Context,
    *,
    integer_vector: bool,
    result_length: int | None,
    with_advertised_keys: bool,
) -> tuple[ClientSecAggState, dict[str, Any]] | Message:
    """The round config checked against the site's policy and the request, the round marked
    as this site's last, and its key pairs (``with_advertised_keys``: the advertised ones);
    or the refusal to send."""
    try:
        payload = dict(msg.content.config_records[RECORD_SECAGG])
        server_round = msg.content.config_records[RECORD_CONFIG]["server_round"]
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise TypeError(f"server_round must be an int, got {type(server_round).__name__}")
        arrays = msg.content.array_records[RECORD_ARRAYS]
        global_length = sum(math.prod(arrays[key].shape) for key in arrays)
    except (KeyError, TypeError, ValueError) as error:
        return refuse(msg, SiteRefusal(RefusalCode.BAD_REQUEST, f"setup request: {error}"))
    expected_length = global_length if result_length is None else result_length
    exchange = exchange_of(msg)
    last = context.state.config_records.get(_last_round_key(exchange))
    previous_round = None if last is None else int(last["round"])
    try:
        policy = _secagg_policy(context.node_config)
    except PolicyError as error:  # the site's own configuration: fix it, then rejoin
        return refuse(msg, SiteRefusal(RefusalCode.SECAGG_POLICY, str(error)))
    try:
        if payload.get("round") != server_round:
            raise SecAggRefusal("setup request: secagg round differs from the request's round")
        advertised = None
        if with_advertised_keys:
            if previous_round is not None and server_round <= previous_round:
                raise SecAggRefusal(
                    f"request for round {server_round} replays or precedes round {previous_round}",
                    code=RefusalCode.OUT_OF_ORDER,
                )
            # Taken out before anything else: whatever happens next, never used twice.
            advertised = claim_next_round_keys(
                _take_next_round_keys(context, exchange), round_id=server_round
            )
        identity = None
        if "roster_digest" in payload:  # an active-coordinator round
            identity = _site_identity(context.node_config, policy)
        state, reply = client_setup(
            site_id=context.node_id,
            request=payload,
            policy=policy,
            previous_round=previous_round,
            identity=identity,
            advertised_keys=advertised,
        )
        if state.config.update_length != expected_length:
            raise SecAggRefusal(
                f"setup request: update length {state.config.update_length} differs from the "
                f"{expected_length} entries of the task's result"
            )
        if state.config.integer_update != integer_vector:
            raise SecAggRefusal(
                "setup request: integer (distributed-DP) and real updates do not mix: the "
                "round config and the declared task differ"
            )
    except SecAggRefusal as refusal:
        return refuse(msg, refusal.refusal())
    # From here on this round is taken: a replay of this setup is refused, trained or not.
    context.state.config_records[_last_round_key(exchange)] = ConfigRecord(
        {"round": state.config.round_id}
    )
    # Keys advertised for this round or an earlier one are never used after it starts.
    _discard_next_round_keys(context, exchange, up_to=state.config.round_id)
    # A new round: whatever an earlier round left behind is stale.
    context.state.config_records.pop(SECAGG_STATE_KEY, None)
    return state, reply


def _contribute_and_reply(
    msg: Message,
    context: Context,
    state: ClientSecAggState,
    reply: dict[str, Any],
    *,
    contribute: Contributor,
) -> Message:
    """Compute the task's result, keep it waiting (encoded, in the node's private spill
    directory) and send ``reply`` with the site's epsilon bound; or the refusal to send."""
    config = state.config
    exchange = exchange_of(msg)
    spill = context.state.config_records.get(SECAGG_SPILL_KEY)
    directory = node_spill_dir(
        existing=None if spill is None else str(spill["dir"]),
        base=str(context.node_config.get("secagg-spill-dir", "")) or None,
    )
    context.state.config_records[SECAGG_SPILL_KEY] = ConfigRecord({"dir": str(directory)})
    discard_pending_updates(directory)
    trained = contribute(msg, context)
    if isinstance(trained, SiteRefusal) or trained.vector.shape != (config.update_length,):
        _release_spill_dir(context, directory)
        refusal = (
            trained
            if isinstance(trained, SiteRefusal)
            else SiteRefusal(
                RefusalCode.BAD_REQUEST,
                "the trained update does not match the round's update length",
            )
        )
        return refuse(msg, refusal)
    weight = min(int(trained.weight), config.max_weight)
    if weight < trained.weight:
        logger.warning("weight capped at secagg max weight %d", config.max_weight)
    if config.integer_update != np.issubdtype(trained.vector.dtype, np.unsignedinteger):
        _release_spill_dir(context, directory)
        return refuse(
            msg,
            SiteRefusal(
                RefusalCode.BAD_REQUEST,
                "integer (distributed-DP) and real updates do not mix: round config differs",
            ),
        )
    if trained.honest_sites:  # distributed DP: h joins this site's floor for the round
        state = dataclasses.replace(state, honest_sites=int(trained.honest_sites))
        if state.graph is not None:  # keys already shared: the sites that set up, again
            try:
                _require_participant_floor(state)
            except TooFewSites as refusal:
                _release_spill_dir(context, directory)
                return refuse(msg, refusal.refusal())
    clipped = 0
    if not config.integer_update:
        clipped = int(np.count_nonzero(np.abs(trained.vector) > config.update_clip))
    if clipped:
        logger.warning(
            "%d of %d update entries exceed the secagg clip %g and are clipped",
            clipped,
            config.update_length,
            config.update_clip,
        )
    try:  # it waits encoded (quantised into the ring), as the masked stage will send it
        encoded = encode_site_input(
            config=config,
            update=trained.vector,
            weight=weight,
            metrics=weighted_metrics(weight=weight, metrics=trained.metrics),
            rng=new_rounding_generator(),
        )
    except ValueError as error:  # the site's own result does not fit the round
        _release_spill_dir(context, directory)
        return refuse(msg, SiteRefusal(RefusalCode.BAD_REQUEST, f"the trained update: {error}"))
    path = save_pending_update(directory, PendingUpdate(round_id=config.round_id, encoded=encoded))
    _store_state(context, state, pending_file=str(path), exchange=exchange)
    out = _secagg_reply(msg, reply)
    out.content.metric_records[RECORD_PRIVACY] = MetricRecord(
        {"epsilon": reported_epsilon(trained.epsilon_bound)}
    )
    return out


def _require_participant_floor(state: ClientSecAggState) -> None:
    """The sites that set up (U1) against this site's floor with distributed DP's h, which
    is known only once the task ran: ``TooFewSites`` below it."""
    assert state.graph is not None
    if state.config.active:
        active_checks.require_active_floor(
            state.config,
            state.policy,
            state.graph.num_participants,
            what="sites finished setup",
            honest_sites=state.honest_sites,
        )
    else:
        state.floor.require(
            state.graph.num_participants,
            num_sampled=state.config.num_sites,
            what="sites finished setup",
        )


def _next_keys_key(exchange: str) -> str:
    return f"{SECAGG_NEXT_KEYS_KEY}-{exchange}"


def _take_next_round_keys(context: Context, exchange: str) -> NextRoundKeys | None:
    """The key pairs this site advertised for its next round of ``exchange``, taken out of
    its state (so they can serve once at most); None when there are none or they are
    unreadable."""
    record = context.state.config_records.pop(_next_keys_key(exchange), None)
    if record is None:
        return None
    try:
        return NextRoundKeys.from_record(record)
    except (KeyError, TypeError, ValueError):
        return None


def _discard_next_round_keys(context: Context, exchange: str, *, up_to: int) -> None:
    """Forget the advertised keys of ``exchange`` made for round ``up_to`` or earlier."""
    record = context.state.config_records.get(_next_keys_key(exchange))
    if record is None:
        return
    try:
        stale = int(record["round"]) <= up_to
    except (KeyError, TypeError, ValueError):
        stale = True
    if stale:
        context.state.config_records.pop(_next_keys_key(exchange), None)


def _advertise_next_round_keys(
    msg: Message, context: Context, state: ClientSecAggState
) -> dict[str, Any]:
    """The unmask reply's fields that advertise this site's keys for the round the request
    names (none when it names none); the private keys go into the node state. A bad
    request for keys only costs the advertisement: the round falls back to setup."""
    exchange = exchange_of(msg)
    request = dict(msg.content.config_records[RECORD_SECAGG])
    try:
        keys, fields = advertise_next_round_keys(
            config=state.config,
            site_id=state.site_id,
            request=request,
            exchange=exchange,
            identity=_round_identity(state, context),
        )
    except ValueError as error:
        logger.warning("no keys advertised for the next round: %s", error)
        return {}
    if keys is not None:
        context.state.config_records[_next_keys_key(exchange)] = ConfigRecord(keys.to_record())
    return fields


def _release_spill_dir(context: Context, directory: Path) -> None:
    """Remove the node's spill directory once it is empty (nothing waits in it)."""
    with contextlib.suppress(OSError):
        directory.rmdir()
        context.state.config_records.pop(SECAGG_SPILL_KEY, None)


def _secagg_policy(node_config: Any) -> ClientSecAggPolicy:
    """The site's own secure-aggregation policy (``client.secagg.policy``: its policy file's
    ``[secure-aggregation]`` table and node config ``secagg-*``)."""
    return ClientSecAggPolicy.for_site(node_config)


def plain_round_refusal(context: Context) -> SiteRefusal | None:
    """A plain-FedAvg request (its update in the clear) is refused by a site whose policy
    demands active-coordinator mode: otherwise a coordinator would only have to switch
    secure aggregation off. A policy that does not parse is left to the task, which refuses
    it with its own code."""
    try:
        policy = _secagg_policy(context.node_config)
    except PolicyError:
        return None
    if policy.require_active_coordinator:
        return SiteRefusal(
            RefusalCode.SECAGG_POLICY,
            "this site's policy requires active-coordinator mode; a plain-FedAvg round would "
            "send its update in the clear",
        )
    return None


def _site_identity(node_config: Any, policy: ClientSecAggPolicy) -> SiteIdentity | None:
    """This site's roster identity (None when it has none configured: the stages then refuse
    an active round). A roster or key file that is unusable is the site's own problem to fix:
    a ``secagg-policy`` refusal, the reason in the site's log."""
    try:
        return identity_from_node_config(node_config, pinned_digest=policy.pinned_roster_digest)
    except (RosterError, SiteSigningKeyError) as error:
        raise SecAggRefusal(
            f"this site's roster or roster signing key is unusable: {error}",
            code=RefusalCode.SECAGG_POLICY,
        ) from None


def _round_identity(state: ClientSecAggState, context: Context) -> SiteIdentity | None:
    """The identity for a stage of this round: only active rounds need one."""
    if not state.config.active:
        return None
    return _site_identity(context.node_config, state.policy)


def _stage_input(msg: Message, context: Context) -> tuple[ClientSecAggState, dict[str, Any]]:
    """This round's state and the request; a refusal when either is missing."""
    record = context.state.config_records.get(SECAGG_STATE_KEY)
    if record is None:
        raise SecAggRefusal(
            "no secure-aggregation round in progress (late or replayed message)",
            code=RefusalCode.OUT_OF_ORDER,
        )
    if RECORD_SECAGG not in msg.content.config_records:
        raise SecAggRefusal("request has no secagg record")
    if str(record.get("exchange", "train")) != exchange_of(msg):
        raise SecAggRefusal(
            f"a {exchange_of(msg)} message during a {record.get('exchange', 'train')} sum "
            "(late or replayed message)",
            code=RefusalCode.OUT_OF_ORDER,
        )
    state_record = {k: v for k, v in dict(record).items() if k != "exchange"}
    return client_state_from_record(state_record), dict(msg.content.config_records[RECORD_SECAGG])


def _store_state(
    context: Context, state: ClientSecAggState, *, pending_file: str = "", exchange: str = ""
) -> None:
    previous = context.state.config_records.get(SECAGG_STATE_KEY)
    if not pending_file and previous is not None:
        pending_file = str(previous.get("pending-file", ""))
    if not exchange:
        exchange = "train" if previous is None else str(previous.get("exchange", "train"))
    context.state.config_records[SECAGG_STATE_KEY] = ConfigRecord(
        client_state_to_record(state) | {"pending-file": pending_file, "exchange": exchange}
    )


def _secagg_reply(msg: Message, payload: dict[str, Any]) -> Message:
    return Message(
        RecordDict(
            {
                RECORD_SECAGG: ConfigRecord(payload),
                RECORD_STATUS: ConfigRecord(status_payload(None)),
            }
        ),
        reply_to=msg,
    )


def _as_refusal(error: Exception) -> SiteRefusal:
    """A stage's exception as a refusal: a ``SecAggRefusal`` keeps its code; anything else
    (stale state, unusable local input) is a bad request."""
    if isinstance(error, SecAggRefusal):
        return error.refusal()
    return SiteRefusal(RefusalCode.BAD_REQUEST, f"{type(error).__name__}: {error}")
