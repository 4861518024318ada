"""SecAgg+ rounds on Flower's Message API: the coordinator never sees one site's update.

Protocol: Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+), with the complete graph of Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017, as its special case. The
arithmetic and the stage functions are Flower-free (``server.secagg.stages``); this module
only moves their payloads through four message exchanges (``common.secure_round``):

    setup (the request's task + advertise keys) -> share keys -> masked input -> unmask
    -> decoded sum

or three, when every sampled site advertised fresh keys for the round in its last unmask
reply (run config ``secagg-advertise-next-keys``; ``client.secagg.next_round_keys`` says why
that is as secure as keys from setup):

    setup and share keys (the request's task + the neighbours' advertised keys)
    -> masked input -> unmask (+ fresh keys for the next round) -> decoded sum

A round in which any sampled site has no advertised keys for it (the first round, a site
not in the previous round of this kind, a site lost before it unmasked) runs all four. The
keys asked for at unmask are those of ``RoundRequest.following_round``: the next training
round, or the next federated evaluation.

In active-coordinator mode (run config ``secagg-active-coordinator``; Bonawitz et al.,
section 6) the coordinator names the federation roster (``secagg-roster-file``), the sites
sign their round keys with their roster keys, and one more exchange runs before unmask:

    ... -> masked input -> consistency (sites sign the survivor set) -> unmask -> sum

What the sites compute at setup is the request's declared task (``common.site_task``): a
model update, one distributed-DP step, or next, federated evaluation's counts; this module
only sums vectors of the shapes it is given.

Each exchange has ``ttl`` = its budget (setup: the round timeout, since the sites train in
it; the others: ``stage_timeout``). Replies are matched to requests by
``metadata.reply_to_message_id`` (ids exist only after ``send_and_receive`` pushed the
messages). An error reply, a missing reply, a refusal or a malformed payload at any stage
makes the site a dropout; a refusal at setup (the site's privacy budget or policy) means the
site does not take part. When fewer sites than the threshold or than the minimum aggregation
size (``common.secagg.aggregation_size``) are left at any stage, the round is aborted and
``RoundAggregate`` carries the reason; the model is left unchanged by the caller.

What the coordinator learns per round: the masked sum over the survivors of weight * update,
of the weights and of weight * metric (steps), which sites dropped out and when,
and each site's own epsilon, in the clear (see docs/secure-aggregation.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedmm.common.secagg.aggregation_size import MIN_AGGREGATION_SIZE
from fedmm.common.secagg.neighbour_graph import DEFAULT_ADVERSARIAL_RATE, DEFAULT_DROPOUT_RATE
from fedmm.common.secagg.protocol_stages import NEXT_ROUND
from fedmm.common.secagg.roster import RosterError, VerifiedRoster, load_roster, verify_roster
from fedmm.common.secure_round import (
    ACTION_CONSISTENCY,
    ACTION_MASKED,
    ACTION_SETUP,
    ACTION_SETUP_SHARE,
    ACTION_SHARE,
    ACTION_UNMASK,
    RECORD_MASKED,
    RECORD_PRIVACY,
    RECORD_SECAGG,
    RECORD_SECAGG_SHARE,
    RECORD_STATUS,
    stage_message_type,
    unflatten_update,
)
from fedmm.common.site_refusal import refusal_code_of
from fedmm.server.aggregation import RoundAggregate, RoundRequest, SiteOutcome
from fedmm.server.reply_polling import PROTOCOL_POLL, poll_replies
from fedmm.server.secagg.advertised_keys import AdvertisedKeys, collect_advertised_keys
from fedmm.server.secagg.stages import (
    AWAITING_CONSISTENCY,
    ServerSecAggState,
    server_collect_consistency,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_start_round,
    server_unmask,
    server_use_advertised_keys,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggSettings:
    """The coordinator's secure-aggregation parameters (run config ``secagg-*``)."""

    bit_width: int = 32
    update_clip: float = 1.0
    max_weight: int = 100_000
    degree: int | None = None  # None: Bell et al.'s default for the sites that finished setup
    threshold: int | None = None
    stage_timeout: float = 600.0
    loss_bound: float = 50.0  # largest mean train loss a site can report (clipped above)
    #: The minimum aggregation size is max(min_sites, ceil(colluding_fraction x sampled) + 2,
    #: min_survivors); the graph defaults assume colluding_fraction and dropout_fraction.
    min_sites: int = MIN_AGGREGATION_SIZE
    colluding_fraction: float = DEFAULT_ADVERSARIAL_RATE
    dropout_fraction: float = DEFAULT_DROPOUT_RATE
    #: Distributed DP: sites send integer vectors (``SecAggRoundConfig.integer_update``), and
    #: the round is discarded before unmasking when fewer than ``min_survivors`` survive.
    integer_update: bool = False
    min_survivors: int = 0
    #: Active-coordinator mode: the federation roster every site signed (None: off).
    roster: VerifiedRoster | None = None
    #: Ask the sites for their next round's fresh keys at unmask, so that round runs in
    #: three exchanges when every site sampled for it advertised keys.
    advertise_next_keys: bool = True

    @classmethod
    def from_federation_config(cls, config: Any) -> SecAggSettings:
        """The settings of the run config; in active-coordinator mode the roster file is
        read and every site's signature on it checked (``ValueError`` naming the file)."""
        roster = None
        if config.secagg_active_coordinator:
            roster = load_federation_roster(config.secagg_roster_file)
        return cls(
            bit_width=config.secagg_bit_width,
            update_clip=config.secagg_update_clip,
            max_weight=config.secagg_max_weight,
            degree=config.secagg_degree or None,
            threshold=config.secagg_threshold or None,
            stage_timeout=config.secagg_stage_timeout,
            min_sites=config.secagg_min_sites,
            colluding_fraction=config.secagg_colluding_fraction,
            dropout_fraction=config.secagg_dropout_fraction,
            roster=roster,
            advertise_next_keys=config.secagg_advertise_next_keys,
        )


def load_federation_roster(path: str) -> VerifiedRoster:
    """The roster at ``path``, with every listed site's signature checked. The coordinator
    only distributes it: it cannot add a site or change a key without every site signing
    again, and each site checks it against the digest it pinned."""
    if not path:
        raise ValueError(
            "run config 'secagg-active-coordinator' = true needs 'secagg-roster-file': the "
            "roster every site signed (docs/operator-guide.md, the roster ceremony)"
        )
    try:
        return verify_roster(load_roster(Path(path)))
    except RosterError as error:
        raise ValueError(f"run config 'secagg-roster-file': {error}") from None


@dataclass
class SecAggRoundReport:
    """What happened in the last round, for logs, tests and benchmarks (no secrets)."""

    round_id: int = 0
    stage_sites: dict[str, list[int]] = field(default_factory=dict)
    exchange_seconds: dict[str, float] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    update_error_bound: float = 0.0
    metric_error_bounds: dict[str, float] = field(default_factory=dict)
    degree: int = 0
    threshold: int = 0
    aborted: str | None = None


class _Stage:
    """Collects the outcome of one exchange: good replies, and dropouts with reasons."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.replies: dict[int, Message] = {}
        self.dropped: dict[int, str] = {}


class SecAggPlusAggregation:
    """``RoundAggregation`` with SecAgg+: only the sum over the surviving sites is revealed."""

    def __init__(self, settings: SecAggSettings | None = None) -> None:
        self.settings = settings or SecAggSettings()
        self.last_round = SecAggRoundReport()
        #: Per exchange kind: the public keys the sites advertised for the next round.
        self._advertised: dict[str, dict[int, AdvertisedKeys]] = {}

    def run_round(
        self, grid: Grid, request: RoundRequest, *, node_ids: Sequence[int]
    ) -> RoundAggregate:
        """Setup sends ``request`` (the task the sites compute, ``common.site_task``) with
        each site's SecAgg+ payload; the sites' results are summed as vectors of
        ``request.shapes`` with the metrics of ``request.metric_ranges``, and only the sum is
        revealed."""
        round_id, shapes, timeout = request.round_id, request.shapes, request.timeout
        settings = self.settings
        kind = request.message_kind
        message_setup = stage_message_type(kind, ACTION_SETUP)
        length = sum(math.prod(shape) for _, shape in shapes)
        report = SecAggRoundReport(round_id=round_id)
        self.last_round = report
        outcomes: dict[int, SiteOutcome] = {}

        def finish(reason: str | None, aggregate: RoundAggregate | None = None) -> RoundAggregate:
            result = aggregate or RoundAggregate(weighted_update_sum=None, total_weight=0.0)
            for node in node_ids:  # sites still in the protocol when it stopped
                outcomes.setdefault(
                    node, SiteOutcome(node, "aborted", reason or "round ended before unmasking")
                )
            result.outcomes = [outcomes[node] for node in node_ids]
            result.aborted = reason
            result.exchange_seconds = report.exchange_seconds
            report.aborted = reason
            if reason:
                logger.warning("round %d: %s", round_id, reason)
            return result

        if len(set(node_ids)) < 2:
            return finish(f"secure aggregation needs at least 2 sites, {len(node_ids)} sampled")
        try:
            state, requests = server_start_round(
                round_id=round_id,
                site_ids=node_ids,
                update_length=length,
                update_clip=settings.update_clip,
                max_weight=settings.max_weight,
                metric_ranges=dict(request.metric_ranges),
                bit_width=settings.bit_width,
                degree=settings.degree,
                threshold=settings.threshold,
                adversarial_rate=settings.colluding_fraction,
                dropout_rate=settings.dropout_fraction,
                min_sites=settings.min_sites,
                honest_sites=settings.min_survivors,
                integer_update=settings.integer_update,
                roster=settings.roster,
            )
        except ValueError as error:
            return finish(f"secure aggregation cannot start: {error}")
        if state.aborted:  # fewer sites sampled than the minimum: nobody trains
            return finish(state.abort_reason)

        setup_requests = requests
        advertised = self._advertised.pop(kind, {})
        use_advertised = settings.advertise_next_keys and all(
            node in advertised and advertised[node].round_id == round_id for node in node_ids
        )
        epsilon_max = 0.0
        if use_advertised:
            # Three exchanges: every sampled site advertised keys for this round in its last
            # unmask reply, so the task travels with the neighbours' keys.
            state, requests = server_use_advertised_keys(
                state=state, keys={node: advertised[node] for node in node_ids}, exchange=kind
            )
            self._drop_rejected(outcomes, set(node_ids) - set(state.advertised_ids), "setup", state)
            report.stage_sites["setup"] = list(state.advertised_ids)
            if state.aborted or state.graph is None:
                return finish(state.abort_reason)
            report.degree, report.threshold = state.graph.degree, state.graph.threshold
            share = self._exchange(
                grid,
                stage_message_type(kind, ACTION_SETUP_SHARE),
                {
                    node: RecordDict(
                        {
                            **dict(request.content.items()),
                            RECORD_SECAGG: ConfigRecord(setup_requests[node]),
                            RECORD_SECAGG_SHARE: ConfigRecord(dict(payload)),
                        }
                    )
                    for node, payload in requests.items()
                },
                ttl=timeout,
            )
            shared, epsilon_max = self._task_replies(share, outcomes, round_id)
            if not shared:
                return finish(_nobody_trained(outcomes), _with_epsilon(epsilon_max))
        else:
            # Stage 0: setup. The sites run the request's task here and answer with their keys.
            setup = self._exchange(
                grid,
                message_setup,
                {
                    node: RecordDict(
                        {**dict(request.content.items()), RECORD_SECAGG: ConfigRecord(payload)}
                    )
                    for node, payload in setup_requests.items()
                },
                ttl=timeout,
            )
            keys, epsilon_max = self._task_replies(setup, outcomes, round_id)
            if not keys:
                return finish(_nobody_trained(outcomes), _with_epsilon(epsilon_max))
            state, requests = server_collect_keys(state=state, replies=keys)
            self._drop_rejected(outcomes, set(keys) - set(state.advertised_ids), "setup", state)
            report.stage_sites["setup"] = list(state.advertised_ids)
            if state.aborted or state.graph is None:
                return finish(state.abort_reason, _with_epsilon(epsilon_max))
            report.degree, report.threshold = state.graph.degree, state.graph.threshold

            # Stage 1: share keys.
            share = self._exchange(
                grid,
                stage_message_type(kind, ACTION_SHARE),
                _config_requests(requests),
                ttl=settings.stage_timeout,
            )
            self._drop(outcomes, share)
            shared = _payloads(share)
        state, requests = server_route_shares(state=state, replies=shared)
        self._drop_rejected(outcomes, set(shared) - set(state.shared_ids), "share_keys", state)
        report.stage_sites["share_keys"] = list(state.shared_ids)
        if state.aborted:
            return finish(state.abort_reason, _with_epsilon(epsilon_max))

        # Stage 2: masked input.
        masked = self._exchange(
            grid,
            stage_message_type(kind, ACTION_MASKED),
            _config_requests(requests),
            ttl=settings.stage_timeout,
        )
        self._drop(outcomes, masked)
        inputs: dict[int, dict[str, Any]] = {}
        for node, payload in _payloads(masked).items():
            vector = _masked_vector(masked.replies[node])
            if vector is None:
                outcomes[node] = SiteOutcome(node, "failed", "masked_input: no masked vector")
                continue
            inputs[node] = {**payload, "masked_input": vector}
        state, requests = server_collect_masked_inputs(state=state, replies=inputs)
        self._drop_rejected(outcomes, set(inputs) - set(state.survivor_ids), "masked_input", state)
        report.stage_sites["masked_input"] = list(state.survivor_ids)
        report.survivors = list(state.survivor_ids)
        if state.aborted:  # below the threshold or the minimum: nothing is unmasked
            return finish(state.abort_reason, _with_epsilon(epsilon_max))

        # Active mode only: the consistency check. Survivors sign the survivor set; unmask
        # goes to those whose signature verified, with t_cc of them.
        if state.stage == AWAITING_CONSISTENCY:
            consistency = self._exchange(
                grid,
                stage_message_type(kind, ACTION_CONSISTENCY),
                _config_requests(requests),
                ttl=settings.stage_timeout,
            )
            for node, reason in consistency.dropped.items():
                logger.warning("site %s did not sign the survivor set: %s", node, reason)
            signed = _payloads(consistency)
            state, requests = server_collect_consistency(state=state, replies=signed)
            report.stage_sites["consistency"] = sorted(state.survivor_signatures)
            if state.aborted:
                return finish(state.abort_reason, _with_epsilon(epsilon_max))

        # Stage 3: unmask. A survivor that does not answer is still in the sum. Each is also
        # asked for fresh keys for the next round of this kind (three exchanges then).
        next_round = request.following_round if settings.advertise_next_keys else 0
        if next_round > round_id:
            requests = {
                node: {**payload, NEXT_ROUND: next_round} for node, payload in requests.items()
            }
        unmask = self._exchange(
            grid,
            stage_message_type(kind, ACTION_UNMASK),
            _config_requests(requests),
            ttl=settings.stage_timeout,
        )
        for node, reason in unmask.dropped.items():
            logger.warning("site %s did not answer the unmask request: %s", node, reason)
        unmasked = _payloads(unmask)
        if next_round > round_id:
            self._advertised[kind], _ = collect_advertised_keys(
                replies=unmasked,
                next_round=next_round,
                exchange=kind,
                roster=settings.roster,
                site_names=state.site_names,
            )
        state, decoded = server_unmask(state=state, replies=unmasked)
        report.stage_sites["unmask"] = sorted(unmasked)
        if decoded is None:
            return finish(state.abort_reason, _with_epsilon(epsilon_max))
        report.update_error_bound = decoded.update_error_bound
        report.metric_error_bounds = dict(decoded.metric_error_bounds)
        for node in state.survivor_ids:
            outcomes[node] = SiteOutcome(node, "trained")
        aggregate = RoundAggregate(
            weighted_update_sum=unflatten_update(decoded.weighted_update_sum, shapes),
            total_weight=float(decoded.weight_sum),
            metric_sums=dict(decoded.metric_sums),
            epsilon_max=epsilon_max,
        )
        return finish(None, aggregate)

    def _exchange(
        self, grid: Grid, message_type: str, contents: Mapping[int, RecordDict], *, ttl: float
    ) -> _Stage:
        started = time.perf_counter()
        stage = _Stage(message_type)
        messages = [
            Message(content, dst_node_id=node, message_type=message_type, ttl=ttl)
            for node, content in contents.items()
        ]
        replies = []
        if messages:
            replies = poll_replies(grid, messages, timeout=ttl, schedule=PROTOCOL_POLL)
        # Message ids are assigned when pushed: map them only now.
        sent = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id)
            if node is None:
                logger.warning("%s: ignoring a reply to no message of this stage", message_type)
                continue
            if node in stage.replies or node in stage.dropped:
                stage.replies.pop(node, None)
                stage.dropped[node] = f"{message_type}: duplicated reply"
            elif reply.has_error():
                error = reply.error
                reason = (error.reason or "").strip().splitlines() or [""]
                stage.dropped[node] = f"{message_type}: error code {error.code}: {reason[-1][:300]}"
            elif reply.metadata.src_node_id != node:
                stage.dropped[node] = f"{message_type}: reply from another node"
            else:
                code = refusal_code_of(reply.content.config_records.get(RECORD_STATUS))
                setup_stage = message_type.endswith((f".{ACTION_SETUP}", f".{ACTION_SETUP_SHARE}"))
                if not setup_stage and code is not None:
                    stage.dropped[node] = f"{message_type}: site refused: {code}"
                elif not setup_stage and RECORD_SECAGG not in reply.content.config_records:
                    stage.dropped[node] = f"{message_type}: reply has no secagg record"
                else:
                    stage.replies[node] = reply
        for node in set(contents) - set(stage.replies) - set(stage.dropped):
            stage.dropped[node] = f"{message_type}: no reply within {ttl:g} s"
        self.last_round.exchange_seconds[message_type] = time.perf_counter() - started
        return stage

    def _task_replies(
        self, stage: _Stage, outcomes: dict[int, SiteOutcome], round_id: int
    ) -> tuple[dict[int, dict[str, Any]], float]:
        """The protocol payloads of the exchange in which the sites ran the task (setup, or
        setup and share keys), and the largest epsilon bound reported; refusals and
        dropouts go into ``outcomes``."""
        epsilon_max = 0.0
        payloads: dict[int, dict[str, Any]] = {}
        for node, reply in stage.replies.items():
            code = refusal_code_of(reply.content.config_records.get(RECORD_STATUS))
            if code is not None:
                outcomes[node] = SiteOutcome(node, "refused", code)
                logger.warning("site %s refused round %d: %s", node, round_id, code)
                continue
            payload = _payload(reply)
            if payload is None:
                stage.dropped[node] = f"{stage.name} reply has no secagg record"
                continue
            payloads[node] = payload
            privacy = reply.content.metric_records.get(RECORD_PRIVACY)
            epsilon = float(privacy.get("epsilon", 0.0)) if privacy is not None else 0.0
            if not math.isnan(epsilon):
                epsilon_max = max(epsilon_max, epsilon)
        self._drop(outcomes, stage)
        return payloads, epsilon_max

    @staticmethod
    def _drop(outcomes: dict[int, SiteOutcome], stage: _Stage) -> None:
        for node, reason in stage.dropped.items():
            outcomes[node] = SiteOutcome(node, "failed", reason)
            logger.warning("site %s dropped out: %s", node, reason)

    @staticmethod
    def _drop_rejected(
        outcomes: dict[int, SiteOutcome], nodes: set[int], stage: str, state: ServerSecAggState
    ) -> None:
        for node in nodes:
            if node not in outcomes:
                reasons = [r for r in state.rejections if r.startswith(f"site {node}:")]
                outcomes[node] = SiteOutcome(
                    node, "failed", reasons[-1] if reasons else f"{stage} reply rejected"
                )


def _nobody_trained(outcomes: Mapping[int, SiteOutcome]) -> str:
    refused = sum(o.status == "refused" for o in outcomes.values())
    failed = sum(o.status == "failed" for o in outcomes.values())
    return f"no site trained this round ({refused} refused, {failed} failed)"


def _with_epsilon(epsilon_max: float) -> RoundAggregate:
    return RoundAggregate(weighted_update_sum=None, total_weight=0.0, epsilon_max=epsilon_max)


def _config_requests(requests: Mapping[int, Mapping[str, Any]]) -> dict[int, RecordDict]:
    return {
        node: RecordDict({RECORD_SECAGG: ConfigRecord(dict(payload))})
        for node, payload in requests.items()
    }


def _payload(reply: Message) -> dict[str, Any] | None:
    record = reply.content.config_records.get(RECORD_SECAGG)
    return None if record is None else dict(record)


def _payloads(stage: _Stage) -> dict[int, dict[str, Any]]:
    return {
        node: dict(reply.content.config_records[RECORD_SECAGG])
        for node, reply in stage.replies.items()
    }


def _masked_vector(reply: Message) -> np.ndarray | None:
    record = reply.content.array_records.get(RECORD_MASKED)
    if record is None:
        return None
    try:
        arrays = record.to_numpy_ndarrays()
    except Exception:  # a malformed array record from a hostile site
        return None
    return arrays[0] if len(arrays) == 1 else None
