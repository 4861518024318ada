"""Distributed DP through the real SecAgg+ handlers and coordinator, in process.

Integer inputs are summed exactly and read back centred; with fewer survivors than the
assumed honest sites, the round is discarded before anything is unmasked, whether the
coordinator checks (no unmask request goes out) or not (every honest site refuses to unmask).
The real DP-SGD step runs in ``tests/simulations/test_distributed_dp_simulation.py``.
"""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import secure_aggregation as client_app
from client.secagg.pending_update import SPILL_DIR_ENV
from common.federation_config import FederationConfig
from common.secure_round import MESSAGE_MASKED, MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_UNMASK
from common.train_request import TrainRequest
from server.secure_aggregation import SecAggPlusAggregation, SecAggSettings

SHAPES = {"w": (40, 25), "b": (25,)}
LENGTH = 40 * 25 + 25
NODES = [5, 17, 2**63 + 9, 99, 2**64 - 2]
HONEST = len(NODES)


class InProcessGrid:
    """Hands each message to the node's real ClientApp handler; records message types."""

    def __init__(self, trainer: client_app.Trainer) -> None:
        self.contexts = {
            node: Context(run_id=3, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in NODES
        }
        self.sent: list[str] = []
        self.failing: dict[str, set[int]] = {}
        self.handlers = {
            MESSAGE_SETUP: lambda m, c: client_app.run_secagg_setup(m, c, train=trainer),
            MESSAGE_SHARE: client_app.secagg_share,
            MESSAGE_MASKED: client_app.secagg_masked,
            MESSAGE_UNMASK: client_app.secagg_unmask,
        }
        self.unmask_replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            kind, node = msg.metadata.message_type, msg.metadata.dst_node_id
            self.sent.append(kind)
            if node in self.failing.get(kind, set()):
                replies.append(Message(Error(code=2, reason="injected fault"), reply_to=msg))
                continue
            reply = self.handlers[kind](msg, self.contexts[node])
            if kind == MESSAGE_UNMASK:
                self.unmask_replies.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _task_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 3, 1, 1
    monkeypatch.setenv(SPILL_DIR_ENV, str(tmp_path))


def _integer_trainer(sums: dict[int, np.ndarray]) -> client_app.Trainer:
    """Each site's signed integer vector (as the DP step makes it), reduced mod 2^32."""

    def train(request: TrainRequest, msg: Message, context: Context):
        rng = np.random.default_rng([context.node_id % 2**32, request.server_round])
        signed = rng.integers(-(10**6), 10**6, LENGTH)
        sums[context.node_id] = signed
        return client_app.LocalUpdate(
            update=np.mod(signed, 2**32).astype(np.uint64),
            num_examples=1000 + context.node_id % 97,
            steps=1,
            epsilon_bound=0.5,
            honest_sites=HONEST,
        )

    return train


def _run(grid: InProcessGrid, aggregation: SecAggPlusAggregation, server_round: int):
    rng = np.random.default_rng(0)
    arrays = ArrayRecord(
        {k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
    )
    request = TrainRequest.for_round(FederationConfig(), server_round).to_config()
    return aggregation.run_round(
        grid,  # type: ignore[arg-type]
        node_ids=sorted(NODES),
        global_arrays=arrays,
        train_config=ConfigRecord(request),
        timeout=60.0,
    )


def test_integer_inputs_are_summed_exactly_and_centred() -> None:
    sums: dict[int, np.ndarray] = {}
    grid = InProcessGrid(_integer_trainer(sums))
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=HONEST))
    result = _run(grid, aggregation, 1)
    assert result.aborted is None
    flat = np.concatenate([result.weighted_update_sum[k].reshape(-1) for k in SHAPES])
    assert np.array_equal(flat, sum(sums.values()).astype(np.float64))
    assert result.total_weight == sum(1000 + node % 97 for node in NODES)
    assert aggregation.last_round.update_error_bound == 0.0


def test_coordinator_discards_a_round_below_the_honest_count_before_unmasking() -> None:
    grid = InProcessGrid(_integer_trainer({}))
    grid.failing = {MESSAGE_MASKED: {NODES[1]}}
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=HONEST))
    result = _run(grid, aggregation, 1)
    assert result.weighted_update_sum is None
    assert "discarded before unmasking" in (result.aborted or "")
    assert MESSAGE_UNMASK not in grid.sent


def test_sites_refuse_to_unmask_below_their_honest_count() -> None:
    """A coordinator that does not check (min_survivors 0) still learns nothing: every
    surviving site refuses the unmask request, so no mask comes off."""
    grid = InProcessGrid(_integer_trainer({}))
    grid.failing = {MESSAGE_MASKED: {NODES[1]}}
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=0))
    result = _run(grid, aggregation, 1)
    assert result.weighted_update_sum is None and result.aborted
    assert grid.unmask_replies and all(
        reply.content.config_records["status"]["refused"] for reply in grid.unmask_replies
    )
    assert all(
        reply.content.config_records["status"]["code"] == "too-few-sites"
        and "reason" not in reply.content.config_records["status"]
        for reply in grid.unmask_replies
    )
    # Nothing about the round is left at the survivors to answer a second request from.
    survivors = [node for node in NODES if node != NODES[1]]
    assert all("secagg" not in grid.contexts[n].state.config_records for n in survivors)


def test_a_real_update_is_refused_in_an_integer_round() -> None:
    def float_trainer(request, msg, context):
        return client_app.LocalUpdate(np.zeros(LENGTH), 100, 1, 0.5)

    grid = InProcessGrid(float_trainer)
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True))
    result = _run(grid, aggregation, 1)
    assert result.weighted_update_sum is None
    assert all(outcome.status == "refused" for outcome in result.outcomes)
