"""Distributed DP through the real SecAgg+ handlers and coordinator, in process.

Integer inputs are summed exactly and read back centred; with fewer survivors than the
assumed honest sites, the round is discarded before anything is unmasked, whether the
coordinator checks (no unmask request goes out) or not (every honest site refuses to unmask).
The real DP-SGD step runs in ``tests/simulations/test_distributed_dp_simulation.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.secure_aggregation import Contributor, SiteContribution
from fedmm.common.secure_round import MESSAGE_MASKED, MESSAGE_UNMASK
from fedmm.common.site_task import SiteTask
from fedmm.server.secure_aggregation import SecAggPlusAggregation, SecAggSettings
from tests.server.in_process_grid import InProcessGrid, run_secure_round

SHAPES = {"w": (40, 25), "b": (25,)}
LENGTH = 40 * 25 + 25
NODES = [5, 17, 2**63 + 9, 99, 2**64 - 2]
HONEST = len(NODES)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 3, 1, 1


def _grid(contribute: Contributor, spill: Path, *, integer_vector: bool = True) -> InProcessGrid:
    return InProcessGrid(
        NODES,
        contribute=contribute,
        integer_vector=integer_vector,
        node_config={"secagg-spill-dir": str(spill)},
        run_id=3,
    )


def _integer_trainer(sums: dict[int, np.ndarray]) -> Contributor:
    """Each site's signed integer vector (as the DP step makes it), reduced mod 2^32."""

    def train(msg: Message, context: Context):
        server_round = int(msg.content.config_records["config"]["server_round"])
        rng = np.random.default_rng([context.node_id % 2**32, server_round])
        signed = rng.integers(-(10**6), 10**6, LENGTH)
        sums[context.node_id] = signed
        return SiteContribution(
            vector=np.mod(signed, 2**32).astype(np.uint64),
            weight=1000 + context.node_id % 97,
            metrics={"steps": 1},
            epsilon_bound=0.5,
            honest_sites=HONEST,
        )

    return train


def _run(grid: InProcessGrid, aggregation: SecAggPlusAggregation, server_round: int):
    rng = np.random.default_rng(0)
    arrays = ArrayRecord(
        {k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
    )
    return run_secure_round(
        aggregation, grid, arrays, server_round, task=SiteTask.DISTRIBUTED_DP_STEP
    )


def test_integer_inputs_are_summed_exactly_and_centred(tmp_path: Path) -> None:
    sums: dict[int, np.ndarray] = {}
    grid = _grid(_integer_trainer(sums), tmp_path)
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=HONEST))
    result = _run(grid, aggregation, 1)
    assert result.aborted is None
    flat = np.concatenate([result.weighted_update_sum[k].reshape(-1) for k in SHAPES])
    assert np.array_equal(flat, sum(sums.values()).astype(np.float64))
    assert result.total_weight == sum(1000 + node % 97 for node in NODES)
    assert aggregation.last_round.update_error_bound == 0.0


def test_coordinator_discards_a_round_below_the_honest_count_before_unmasking(
    tmp_path: Path,
) -> None:
    grid = _grid(_integer_trainer({}), tmp_path)
    grid.fault = lambda kind, node: "error" if (kind, node) == (MESSAGE_MASKED, NODES[1]) else None
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=HONEST))
    result = _run(grid, aggregation, 1)
    assert result.weighted_update_sum is None
    assert "discarded before unmasking" in (result.aborted or "")
    assert MESSAGE_UNMASK not in grid.sent_types()


def test_sites_refuse_to_unmask_below_their_honest_count(tmp_path: Path) -> None:
    """A coordinator that does not check (min_survivors 0) still learns nothing: every
    surviving site refuses the unmask request, so no mask comes off."""
    grid = _grid(_integer_trainer({}), tmp_path)
    grid.fault = lambda kind, node: "error" if (kind, node) == (MESSAGE_MASKED, NODES[1]) else None
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=0))
    result = _run(grid, aggregation, 1)
    assert result.weighted_update_sum is None and result.aborted
    unmask_replies = grid.replies_to(MESSAGE_UNMASK)
    assert unmask_replies and all(
        reply.content.config_records["status"]["refused"] for reply in unmask_replies
    )
    assert all(
        reply.content.config_records["status"]["code"] == "too-few-sites"
        and "reason" not in reply.content.config_records["status"]
        for reply in unmask_replies
    )
    # Nothing about the round is left at the survivors to answer a second request from.
    survivors = [node for node in NODES if node != NODES[1]]
    assert all("secagg" not in grid.contexts[n].state.config_records for n in survivors)


def test_a_real_update_is_refused_in_an_integer_round(tmp_path: Path) -> None:
    def float_trainer(msg, context):
        return SiteContribution(np.zeros(LENGTH), 100, {"steps": 1}, 0.5)

    grid = _grid(float_trainer, tmp_path)
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True))
    result = _run(grid, aggregation, 1)
    assert result.weighted_update_sum is None
    assert all(outcome.status == "refused" for outcome in result.outcomes)
