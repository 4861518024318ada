"""How the sites' results of one exchange become one aggregate: the seam secure aggregation
implements.

``RoundAggregation.run_round`` sends one request to each site, collects what the sites return
and hands back only the aggregate: the weighted sum of the sites' vectors (a model update, in
the arrays named by ``shapes``), the total weight (the sum of the sites' noisy record
counts), and the weighted sums of the metrics named in ``metric_ranges``. What the sites
compute is the request's declared task (``common.site_task``), not the aggregation's concern.
``FedAvgAggregation`` is plain FedAvg (McMahan et al., AISTATS 2017) in one message
exchange; a secure-aggregation implementation runs several exchanges and never sees a
single site's vector.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedmm.common.secure_round import METRIC_EPSILON_BOUND, METRIC_NUM_EXAMPLES, RECORD_STATUS
from fedmm.common.site_refusal import refusal_code_of
from fedmm.common.site_task import RECORD_METRICS, RECORD_UPDATE

#: The arrays of a site's vector: (name, shape) in order (a model's state-dict order).
Shapes = Sequence[tuple[str, tuple[int, ...]]]

logger = logging.getLogger(__name__)


class SitesNotConnectedError(RuntimeError):
    """Fewer sites connected than a run needs, within the time allowed."""


def wait_for_sites(
    grid: Grid, minimum: int, *, timeout: float = 120.0, setting: str = "min-available-sites"
) -> list[int]:
    """Node ids once at least ``minimum`` sites are connected (they register lazily);
    ``setting`` names what asked for ``minimum`` in the error."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() > deadline:
            raise SitesNotConnectedError(
                f"only {len(node_ids)} site(s) connected after {timeout:.0f} s; "
                f"{setting} asks for {minimum}: start more sites or lower it"
            )
        time.sleep(0.5)


@dataclass
class SiteOutcome:
    node_id: int
    status: str  # "trained", "refused", "failed", "aborted"
    reason: str = ""  # a refusal: the site's code (``common.site_refusal``), never its text


@dataclass
class RoundAggregate:
    """What the coordinator learns from one round."""

    weighted_update_sum: dict[str, np.ndarray] | None
    total_weight: float
    metric_sums: dict[str, float] = field(default_factory=dict)
    #: The largest epsilon *bound* a site that replied committed to (its policy's
    #: max-epsilon capped by the run's epsilon), never a site's exact spend.
    epsilon_max: float = 0.0
    outcomes: list[SiteOutcome] = field(default_factory=list)
    aborted: str | None = None
    #: Wall time of each message exchange (SecAgg+ only), for the round's metrics.
    exchange_seconds: dict[str, float] | None = None

    def mean_update(self) -> dict[str, np.ndarray] | None:
        if self.weighted_update_sum is None or self.total_weight <= 0:
            return None
        return {k: v / self.total_weight for k, v in self.weighted_update_sum.items()}

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


@dataclass(frozen=True)
class RoundRequest:
    """What every site of one round is sent, and the shape of what it returns."""

    round_id: int
    #: The request: the model and the task it declares (``common.site_task``).
    content: RecordDict
    #: The arrays of a site's vector, in order.
    shapes: Shapes
    #: The metrics a site's result carries, summed; their ranges bound what a secure sum
    #: encodes.
    metric_ranges: Mapping[str, tuple[float, float]]
    #: The budget in seconds of the exchange in which the sites compute.
    timeout: float
    #: The Flower message type the request travels in: ``train``, or ``evaluate`` for an
    #: evaluation task (``common.site_task.exchange_kind``).
    message_kind: str = "train"
    #: The round of the same kind that comes next, for which a secure sum asks the sites to
    #: advertise fresh keys now (None: ``round_id + 1``; 0: no round follows).
    next_round_id: int | None = None

    @property
    def following_round(self) -> int:
        """The next round of this kind (0: none)."""
        return self.round_id + 1 if self.next_round_id is None else self.next_round_id


class RoundAggregation(Protocol):
    def run_round(
        self, grid: Grid, request: RoundRequest, *, node_ids: Sequence[int]
    ) -> RoundAggregate:
        """Send ``request`` to each of ``node_ids`` and aggregate what they return."""
        ...


def _reply_outcome(reply: Message, node_id: int) -> SiteOutcome:
    if reply.has_error():
        error = reply.error
        return SiteOutcome(node_id, "failed", f"error code {error.code}: {error.reason}")
    code = refusal_code_of(reply.content.config_records.get(RECORD_STATUS))
    if code is not None:
        return SiteOutcome(node_id, "refused", code)
    content = reply.content
    if RECORD_UPDATE not in content.array_records or RECORD_METRICS not in content.metric_records:
        return SiteOutcome(node_id, "failed", "reply has no update or no metrics")
    return SiteOutcome(node_id, "trained")


class FedAvgAggregation:
    """Plain example-weighted FedAvg: the coordinator sees each site's update."""

    def run_round(
        self, grid: Grid, request: RoundRequest, *, node_ids: Sequence[int]
    ) -> RoundAggregate:
        timeout = request.timeout
        messages = [
            Message(
                request.content,
                dst_node_id=node_id,
                message_type=request.message_kind,
                ttl=timeout,
            )
            for node_id in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        # message ids are assigned when pushed; replies (and SuperLink errors) refer to them
        sent = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
        expected, summed = dict(request.shapes), tuple(request.metric_ranges)
        aggregate = RoundAggregate(weighted_update_sum=None, total_weight=0.0)
        answered = set()
        for reply in replies:
            node_id = sent.get(reply.metadata.reply_to_message_id)
            if node_id is None:
                logger.warning("ignoring a reply to no message of this round")
                continue
            answered.add(node_id)
            outcome = _reply_outcome(reply, node_id)
            if outcome.status == "trained":
                outcome = self._add(aggregate, reply, outcome, expected, summed)
            aggregate.outcomes.append(outcome)
            if outcome.status != "trained":
                logger.warning(
                    "site %s %s round %d: %s",
                    node_id,
                    outcome.status,
                    request.round_id,
                    outcome.reason,
                )
        for node_id in set(node_ids) - answered:
            aggregate.outcomes.append(SiteOutcome(node_id, "failed", "no reply before timeout"))
            logger.warning(
                "site %s failed round %d: no reply before timeout", node_id, request.round_id
            )
        return aggregate

    @staticmethod
    def _add(
        aggregate: RoundAggregate,
        reply: Message,
        outcome: SiteOutcome,
        expected: Mapping[str, tuple[int, ...]],
        summed_metrics: Sequence[str],
    ) -> SiteOutcome:
        update = reply.content.array_records[RECORD_UPDATE]
        metrics = reply.content.metric_records[RECORD_METRICS]
        weight = float(metrics.get(METRIC_NUM_EXAMPLES, 0))
        if set(update.keys()) != set(expected) or not weight > 0:
            return SiteOutcome(outcome.node_id, "failed", "malformed update (keys or weight)")
        arrays = {k: update[k].numpy() for k in expected}
        for k, value in arrays.items():
            if value.shape != tuple(expected[k]) or not np.isfinite(value).all():
                return SiteOutcome(outcome.node_id, "failed", f"malformed update for {k}")
        if aggregate.weighted_update_sum is None:
            aggregate.weighted_update_sum = {k: np.zeros_like(v) for k, v in arrays.items()}
        for k, value in arrays.items():
            aggregate.weighted_update_sum[k] += weight * value
        aggregate.total_weight += weight
        for key in summed_metrics:
            aggregate.metric_sums[key] = aggregate.metric_sums.get(key, 0.0) + weight * float(
                metrics.get(key, 0.0)
            )
        epsilon = float(metrics.get(METRIC_EPSILON_BOUND, 0.0))
        aggregate.epsilon_max = max(
            aggregate.epsilon_max, epsilon if not math.isnan(epsilon) else 0
        )
        return outcome
