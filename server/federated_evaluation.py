"""Federated evaluation: the global model measured on the sites' held-out records.

After the rounds the run config names (``eval-every``, and after the last), the coordinator
sends the connected sites (``fraction-evaluate`` of them, all by default) an ``evaluate``
request declaring the task ``federated_eval`` with the global model; each site counts
retrieval hits on its own held-out records (``client.federated_evaluation``,
``common.federated_eval``) and the counts are summed under SecAgg+ (Bell et al., CCS 2020)
in the four ``evaluate.secagg_*`` exchanges: the coordinator learns only the federation's
totals, over at least the minimum aggregation size of sites, whatever the training rounds'
aggregation is. Plain FedAvg runs sum their evaluation the same way: the README's privacy
section promises that record counts are never released in the clear, and a site's held-out
count is one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import Grid

from fedmm.common.federated_eval import EvaluationCounts
from fedmm.common.federation_config import FederationConfig
from fedmm.common.site_task import SiteTask
from fedmm.common.train_request import TrainRequest
from fedmm.server.aggregation import RoundAggregate, RoundAggregation
from fedmm.server.round_modes import TaskRequest, Weights, sample_sites, send_task
from fedmm.server.secure_aggregation import SecAggPlusAggregation, SecAggSettings

logger = logging.getLogger(__name__)

#: The one array of a site's result: its counts (``EvaluationCounts`` order).
COUNTS = "counts"


def evaluation_request(config: FederationConfig, server_round: int) -> TaskRequest:
    """The evaluation's request: the round's request fields (model geometry, caption bank,
    ``eval-fraction``) declaring ``federated_eval``; the result is a counts vector."""
    return TaskRequest(
        task=SiteTask.FEDERATED_EVAL,
        server_round=server_round,
        fields=TrainRequest.for_round(config, server_round).to_config(),
        metric_ranges={},
        timeout=config.round_timeout,
        shapes=[(COUNTS, (EvaluationCounts.length(),))],
        next_round_id=config.next_evaluation_round(server_round),
    )


def evaluation_row(aggregate: RoundAggregate) -> dict[str, Any]:
    """``metrics.jsonl``'s ``federated_eval`` object: the federation's rates and record
    count, the sites summed, refused and failed, or why nothing was released."""
    row: dict[str, Any] = {
        "sites_evaluated": aggregate.count("trained"),
        "sites_refused": aggregate.count("refused"),
        "sites_failed": aggregate.count("failed") + aggregate.count("aborted"),
    }
    if aggregate.exchange_seconds is not None:
        row["secagg_stage_s"] = {k: round(v, 3) for k, v in aggregate.exchange_seconds.items()}
    if aggregate.aborted or aggregate.weighted_update_sum is None:
        row["aborted"] = aggregate.aborted or "no site evaluated"
        return row
    try:
        counts = EvaluationCounts.from_vector(aggregate.weighted_update_sum[COUNTS])
    except ValueError as error:
        row["aborted"] = f"the summed counts are not counts: {error}"
        return row
    if counts.records != int(aggregate.total_weight):
        row["aborted"] = "the summed record count differs from the summed weights"
        return row
    row.update(counts.rates())
    return row


@dataclass
class FederatedEvaluation:
    """The run's evaluation at the sites: one secure sum of counts over every site."""

    config: FederationConfig
    aggregation: RoundAggregation

    def run(
        self, grid: Grid, *, server_round: int, node_ids: Sequence[int], weights: Weights
    ) -> dict[str, Any]:
        """Evaluate ``weights`` at ``node_ids``; the ``federated_eval`` object."""
        request = evaluation_request(self.config, server_round)
        aggregate = send_task(self.aggregation, grid, request, node_ids=node_ids, weights=weights)
        row = evaluation_row(aggregate)
        if "aborted" in row:
            logger.warning("round %d: federated evaluation: %s", server_round, row["aborted"])
        return row


def evaluation_sample(
    config: FederationConfig, node_ids: Sequence[int], server_round: int
) -> list[int]:
    """The sites asked to evaluate after ``server_round``: ``fraction-evaluate`` of the
    connected ones, at least ``secagg-min-sites``, drawn from the run's seed and the round
    alone, so a resumed run and the training rounds' own sampling are unaffected."""
    rng = random.Random(f"{config.seed}:federated-eval:{server_round}")
    return sample_sites(
        node_ids, fraction=config.fraction_evaluate, minimum=config.secagg_min_sites, rng=rng
    )


def federated_evaluation_for(config: FederationConfig) -> FederatedEvaluation | None:
    """The run's federated evaluation (None with ``federated-eval = false``): a SecAgg+ sum
    of integer vectors under the run's ``secagg-*`` settings, with no DP-noise floor of
    honest survivors (the counts carry no noise shares)."""
    if not config.federated_eval:
        return None
    settings = dataclasses.replace(
        SecAggSettings.from_federation_config(config), integer_update=True, min_survivors=0
    )
    return FederatedEvaluation(config, SecAggPlusAggregation(settings))
