"""How a round moves the model: one mode a run, chosen once from the run config.

A mode owns the three things that differ between kinds of round: what the coordinator asks
the sites (the task a request declares, ``common.site_task``), how their results are
aggregated (``server.aggregation``: plain FedAvg in one exchange, or a SecAgg+ sum in four,
``server.secure_aggregation``), and how the model moves with the aggregate.
``server.federation.run_federation`` runs every mode the same way.

- :class:`LocalDPRounds`: DP-SGD at each sampled site under its own policy and ledger
  (record-level DP at each site; Abadi et al., CCS 2016), then the FedAvg step on the
  example-weighted mean update (McMahan et al., AISTATS 2017). The aggregation is plain
  FedAvg (the coordinator sees each DP-noised update) or SecAgg+ (Bell et al., CCS 2020:
  only the sum).
- :class:`DistributedDPRounds`: every site every round; one DP-SGD step on the union of the
  sites' records, whose noise is the sum of the sites' Skellam shares inside a SecAgg+ sum
  of integer vectors (Kairouz, Liu, Steinke, ICML 2021; Agarwal, Kairouz, Liu, NeurIPS 2021;
  ``server.distributed_dp``).

Federated evaluation (``server.federated_evaluation``) is the other kind of exchange: a
request declaring an evaluation task, whose site result is a vector of counts summed by the
same ``RoundAggregation`` (SecAgg+) as an update is; :func:`send_task` is how a mode or an
evaluation asks for a task's results.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedmm.common.distributed_dp.plan import DistributedDPPlan
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secure_round import metric_ranges
from fedmm.common.site_task import (
    RECORD_ARRAYS,
    RECORD_CONFIG,
    RECORD_PLAN,
    SiteTask,
    exchange_kind,
    task_config,
)
from fedmm.common.train_request import TrainRequest
from fedmm.server import distributed_dp
from fedmm.server.aggregation import (
    FedAvgAggregation,
    RoundAggregate,
    RoundAggregation,
    RoundRequest,
)
from fedmm.server.secure_aggregation import SecAggPlusAggregation, SecAggSettings

logger = logging.getLogger(__name__)

Weights = Mapping[str, torch.Tensor]


class RoundMode(Protocol):
    """One kind of round: whom it asks, what it sends, how the model moves."""

    #: What the mode carries from round to round (checkpointed; distributed DP's momentum).
    server_state: dict[str, torch.Tensor]

    def sample(self, node_ids: Sequence[int], rng: random.Random) -> list[int]:
        """The sites asked this round (``rng`` is the run's sampling stream)."""
        ...

    def run_round(
        self, grid: Grid, *, server_round: int, node_ids: Sequence[int], weights: Weights
    ) -> RoundAggregate:
        """Send the round's requests and aggregate what the sites return."""
        ...

    def step(self, weights: Weights, aggregate: RoundAggregate, *, server_round: int) -> Weights:
        """The model after the round (called only when the round was not aborted)."""
        ...

    def privacy_statement(self) -> str:
        """The run's guarantee in plain words (report and summary)."""
        ...


def sample_sites(
    node_ids: Sequence[int], *, fraction: float, minimum: int, rng: random.Random
) -> list[int]:
    count = min(len(node_ids), max(minimum, math.ceil(fraction * len(node_ids))))
    return sorted(rng.sample(list(node_ids), count))


@dataclass(frozen=True)
class TaskRequest:
    """What the coordinator asks the sites in one exchange: the task, its fields, and what
    the aggregation needs to know of the results."""

    task: SiteTask
    server_round: int
    fields: Mapping[str, Any]  # the request's ``config`` record besides the task
    metric_ranges: Mapping[str, tuple[float, float]]  # the metrics the sites' results sum
    timeout: float  # the budget of the exchange in which the sites compute
    plan: DistributedDPPlan | None = None
    #: The arrays of a site's result, (name, shape) in order; None: shaped as the model (an
    #: update).
    shapes: Sequence[tuple[str, tuple[int, ...]]] | None = None
    #: The next round of the same task's kind (a secure sum asks the sites for fresh keys
    #: for it at unmask; None: the next round, 0: none follows).
    next_round_id: int | None = None


def send_task(
    aggregation: RoundAggregation,
    grid: Grid,
    request: TaskRequest,
    *,
    node_ids: Sequence[int],
    weights: Weights,
) -> RoundAggregate:
    """Ask ``node_ids`` for ``request``'s task on the model ``weights``; the aggregate of
    their results (vectors of ``request.shapes``, by default shaped as the model), in
    messages of the task's kind (``train`` or ``evaluate``)."""
    records = {
        RECORD_ARRAYS: ArrayRecord(dict(weights)),
        RECORD_CONFIG: ConfigRecord(task_config(request.task, request.fields)),
    }
    if request.plan is not None:
        records[RECORD_PLAN] = ConfigRecord(request.plan.to_config())
    shapes = request.shapes
    if shapes is None:
        shapes = [(key, tuple(value.shape)) for key, value in weights.items()]
    round_request = RoundRequest(
        round_id=request.server_round,
        content=RecordDict(records),
        shapes=shapes,
        metric_ranges=request.metric_ranges,
        timeout=request.timeout,
        message_kind=exchange_kind(request.task),
        next_round_id=request.next_round_id,
    )
    return aggregation.run_round(grid, round_request, node_ids=node_ids)


def training_request(
    config: FederationConfig,
    task: SiteTask,
    server_round: int,
    *,
    plan: DistributedDPPlan | None = None,
) -> TaskRequest:
    """A training round's request: the round's train request, and the ranges of the metrics
    it sums (a site's steps, times its weight)."""
    max_weight = config.secagg_max_weight
    max_steps = config.local_epochs * math.ceil(max_weight / max(1, config.batch_size))
    return TaskRequest(
        task=task,
        server_round=server_round,
        fields=TrainRequest.for_round(config, server_round).to_config(),
        metric_ranges=metric_ranges(max_weight=max_weight, max_steps=max_steps),
        timeout=config.round_timeout,
        plan=plan,
        next_round_id=server_round + 1 if server_round < config.num_server_rounds else 0,
    )


@dataclass
class LocalDPRounds:
    """DP-SGD at each sampled site, then the FedAvg step on the mean of their updates."""

    config: FederationConfig
    aggregation: RoundAggregation
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def sample(self, node_ids: Sequence[int], rng: random.Random) -> list[int]:
        config = self.config
        return sample_sites(
            node_ids, fraction=config.fraction_train, minimum=config.min_train_sites, rng=rng
        )

    def run_round(
        self, grid: Grid, *, server_round: int, node_ids: Sequence[int], weights: Weights
    ) -> RoundAggregate:
        request = training_request(self.config, SiteTask.LOCAL_DP_SGD, server_round)
        return send_task(self.aggregation, grid, request, node_ids=node_ids, weights=weights)

    def step(self, weights: Weights, aggregate: RoundAggregate, *, server_round: int) -> Weights:
        mean_update = aggregate.mean_update()
        if mean_update is None:
            raise ValueError("no update to step with")
        rate = self.config.server_learning_rate
        return {k: weights[k] + rate * torch.from_numpy(mean_update[k]) for k in weights}

    def privacy_statement(self) -> str:
        return local_dp_statement(self.config)


@dataclass
class DistributedDPRounds:
    """Every site every round; one DP-SGD step on the noisy sum SecAgg+ reveals."""

    config: FederationConfig
    aggregation: SecAggPlusAggregation
    plan: DistributedDPPlan
    num_sites: int
    #: The coordinator's momentum (post-processing of earlier sums only).
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def sample(self, node_ids: Sequence[int], rng: random.Random) -> list[int]:
        return list(node_ids)

    def run_round(
        self, grid: Grid, *, server_round: int, node_ids: Sequence[int], weights: Weights
    ) -> RoundAggregate:
        request = training_request(
            self.config, SiteTask.DISTRIBUTED_DP_STEP, server_round, plan=self.plan
        )
        return send_task(self.aggregation, grid, request, node_ids=node_ids, weights=weights)

    def step(self, weights: Weights, aggregate: RoundAggregate, *, server_round: int) -> Weights:
        if aggregate.weighted_update_sum is None:
            raise ValueError("no noisy sum to step with")
        return distributed_dp.noisy_gradient_step(
            weights,
            aggregate.weighted_update_sum,
            total_records=aggregate.total_weight,
            plan=self.plan,
            learning_rate=self.config.learning_rate_in_round(server_round),
            momentum=self.config.momentum,
            velocity=self.server_state,
        )

    def privacy_statement(self) -> str:
        return distributed_dp.privacy_statement(self.plan, num_sites=self.num_sites)


def round_mode_for(config: FederationConfig, *, dimension: int, num_sites: int) -> RoundMode:
    """The run's mode: distributed DP (``dp-mode``; the run config already requires SecAgg+
    for it), else DP-SGD at the sites with SecAgg+ (``secure-aggregation``) or plain FedAvg.
    ``dimension``: the model's trainable parameters; ``num_sites``: the sites connected."""
    secagg = SecAggSettings.from_federation_config(config)
    if config.dp_mode == "distributed":
        plan = distributed_dp.plan_run(config, dimension=dimension, num_sites=num_sites)
        logger.info(distributed_dp.privacy_statement(plan, num_sites=num_sites))
        aggregation = SecAggPlusAggregation(distributed_dp.secagg_settings(secagg, plan))
        return DistributedDPRounds(config, aggregation, plan, num_sites)
    if config.secure_aggregation:
        return LocalDPRounds(config, SecAggPlusAggregation(secagg))
    return LocalDPRounds(config, FedAvgAggregation())


def local_dp_statement(config: FederationConfig) -> str:
    if not config.private:
        return "DP off (epsilon = inf): no formal privacy guarantee for the model."
    return (
        f"record-level (epsilon, delta)-DP at each site under add/remove of one record, "
        f"epsilon <= {config.epsilon:g} requested, delta <= {config.delta:g}, Opacus RDP "
        "accountant, cumulative over the site's ledger (DP-SGD with Poisson sampling and "
        "Gaussian noise from a CSPRNG, and the site's noisy record count); a site's own "
        "policy may make it stricter. epsilon_bound_max is the largest bound a site "
        "committed to (sites report their bound, not their exact spend, which is a function "
        "of their record count; each site's exact epsilon is in its ledger)."
    )
