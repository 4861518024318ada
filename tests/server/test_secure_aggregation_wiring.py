"""SecAggPlusAggregation and the site's SecAgg+ handlers, wired through real Messages.

A small in-process Grid (``tests.server.in_process_grid``) hands every message to the site's
SecAgg+ handler that Flower would route it to (one Context per node, as a SuperNode keeps
it), so these tests run the real message contents, reply matching, dropouts and refusals in
a second, without Ray. Setup uses a numpy trainer instead of DP-SGD; the Flower simulation
tests run the real one.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.secure_aggregation import (
    SECAGG_STATE_KEY,
    Contributor,
    SiteContribution,
    run_secagg_setup,
)
from fedmm.common.secure_round import (
    MESSAGE_MASKED,
    MESSAGE_SETUP,
    MESSAGE_SHARE,
    MESSAGE_UNMASK,
    RECORD_SECAGG,
    RECORD_STATUS,
    flatten_update,
)
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.server.secure_aggregation import SecAggPlusAggregation, SecAggSettings
from tests.server.in_process_grid import InProcessGrid, run_secure_round, train_request

SHAPES = {"a.weight": (30, 20), "a.bias": (20,), "b": (7, 3, 5)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    """Where the sites' updates wait (node config ``secagg-spill-dir``)."""
    return tmp_path


def _grid(nodes: list[int], contribute: Contributor, spill: Path, **node_config: Any):
    config = {"secagg-spill-dir": str(spill), **node_config}
    return InProcessGrid(nodes, contribute=contribute, node_config=config)


def _global_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def _numpy_trainer(
    updates: dict[int, np.ndarray], weights: dict[int, int], refuse: set[int] = frozenset()
) -> Contributor:
    def train(msg: Message, context: Context):
        node = context.node_id
        if node in refuse:
            return SiteRefusal(RefusalCode.PRIVACY_BUDGET, "test refusal: 2.99 of 3 spent")
        keys = list(msg.content.array_records["arrays"].keys())
        server_round = int(msg.content.config_records["config"]["server_round"])
        rng = np.random.default_rng([node, server_round])
        update = {k: rng.normal(0, 0.05, SHAPES[k]) for k in keys}
        updates[node] = flatten_update(update, keys)
        weights[node] = int(rng.integers(50, 500))
        return SiteContribution(
            vector=updates[node],
            weight=weights[node],
            metrics={"steps": 3},
            epsilon_bound=0.1 * (node % 7) + 0.123,
        )

    return train


def _run(grid: InProcessGrid, server_round: int, aggregation: SecAggPlusAggregation):
    return run_secure_round(aggregation, grid, _global_arrays(), server_round)


def _plain_mean(updates, weights, sites) -> dict[str, np.ndarray]:
    total = sum(weights[s] for s in sites)
    flat = sum(weights[s] * np.clip(updates[s], -1, 1) for s in sites) / total
    out, start = {}, 0
    for key, shape in SHAPES.items():
        size = math.prod(shape)
        out[key] = flat[start : start + size].reshape(shape)
        start += size
    return out


NODES = [11, 2**64 - 3, 2**63 + 5, 40, 55]


def test_round_decodes_the_weighted_mean_and_reveals_no_update(spill: Path) -> None:
    updates, weights = {}, {}
    grid = _grid(NODES, _numpy_trainer(updates, weights), spill)
    aggregation = SecAggPlusAggregation()
    result = _run(grid, 1, aggregation)
    assert result.aborted is None
    assert result.count("trained") == 5
    assert result.total_weight == sum(weights.values())  # exact, but only as a sum
    bound = aggregation.last_round.update_error_bound / result.total_weight
    plain = _plain_mean(updates, weights, NODES)
    mean = result.mean_update()
    assert mean is not None
    for key in SHAPES:
        assert np.abs(mean[key] - plain[key]).max() <= bound
    assert math.isclose(result.metric_sums["steps"] / result.total_weight, 3.0, rel_tol=1e-3)
    assert "train-loss" not in result.metric_sums  # no site sends its train loss
    assert math.isclose(result.epsilon_max, max(0.1 * (n % 7) + 0.13 for n in NODES), abs_tol=1e-9)
    # Nothing a site sent carries its update, weight or metrics in the clear.
    for reply in grid.received:
        for record in reply.content.config_records.values():
            for value in record.values():
                assert not (isinstance(value, int) and value in weights.values())
        for name, record in reply.content.array_records.items():
            assert name == "masked"
            (vector,) = record.to_numpy_ndarrays()
            assert vector.dtype == np.uint32
        assert all(set(r) <= {"epsilon"} for r in reply.content.metric_records.values())
    # The waiting updates are gone and the nodes keep only small state.
    assert not list(spill.iterdir())  # not even the directories
    for context in grid.contexts.values():
        assert SECAGG_STATE_KEY not in context.state.config_records


def test_setup_keeps_the_update_in_a_private_file_not_in_state(spill: Path) -> None:
    updates, weights = {}, {}
    grid = _grid(NODES[:3], _numpy_trainer(updates, weights), spill)
    grid.fault = lambda kind, node: "drop" if kind == MESSAGE_SHARE else None
    result = _run(grid, 1, SecAggPlusAggregation())
    assert result.aborted is not None and "threshold" in result.aborted
    files = list(spill.rglob("pending-round-*"))
    assert len(files) == 3
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert all(f.parent.stat().st_mode & 0o777 == 0o700 for f in files)
    for context in grid.contexts.values():
        record = context.state.config_records[SECAGG_STATE_KEY]
        assert sum(len(v) if isinstance(v, bytes | str) else 8 for v in record.values()) < 4000


@pytest.mark.parametrize("stage", [MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_MASKED, MESSAGE_UNMASK])
@pytest.mark.parametrize("kind", ["drop", "error"])
def test_one_site_lost_at_any_stage_the_round_completes(stage: str, kind: str, spill: Path) -> None:
    updates, weights = {}, {}
    grid = _grid(NODES, _numpy_trainer(updates, weights), spill)
    lost = NODES[1]
    grid.fault = lambda t, node: kind if (t == stage and node == lost) else None
    aggregation = SecAggPlusAggregation(SecAggSettings(degree=4, threshold=3))
    result = _run(grid, 1, aggregation)
    assert result.aborted is None
    summed = [n for n in NODES if n != lost] if stage != MESSAGE_UNMASK else NODES
    assert sorted(aggregation.last_round.survivors) == sorted(summed)
    assert result.total_weight == sum(weights[n] for n in summed)
    mean = result.mean_update()
    plain = _plain_mean(updates, weights, summed)
    bound = aggregation.last_round.update_error_bound / result.total_weight
    assert all(np.abs(mean[k] - plain[k]).max() <= bound for k in SHAPES)
    if stage != MESSAGE_UNMASK:
        (outcome,) = [o for o in result.outcomes if o.node_id == lost]
        assert outcome.status == "failed" and stage in outcome.reason


def test_below_threshold_aborts_then_the_next_round_runs(spill: Path) -> None:
    updates, weights = {}, {}
    grid = _grid(NODES, _numpy_trainer(updates, weights), spill)
    lost = set(NODES[:3])
    grid.fault = lambda t, node: "drop" if (t == MESSAGE_MASKED and node in lost) else None
    aggregation = SecAggPlusAggregation(SecAggSettings(degree=4, threshold=3))
    first = _run(grid, 1, aggregation)
    assert first.aborted is not None and "threshold 3" in first.aborted
    assert first.mean_update() is None
    grid.fault = lambda t, node: None
    second = _run(grid, 2, aggregation)
    assert second.aborted is None and second.count("trained") == 5


def test_budget_refusal_at_setup_means_the_site_does_not_take_part(spill: Path) -> None:
    updates, weights = {}, {}
    grid = _grid(NODES, _numpy_trainer(updates, weights, refuse={NODES[0]}), spill)
    result = _run(grid, 1, SecAggPlusAggregation())
    assert result.aborted is None
    (refused,) = [o for o in result.outcomes if o.status == "refused"]
    assert refused.node_id == NODES[0] and refused.reason == "privacy-budget"
    # Only the code reaches the coordinator: the site's detail stays in the site's log.
    assert "2.99" not in refused.reason
    assert result.total_weight == sum(weights[n] for n in NODES[1:])


def test_every_site_refusing_leaves_no_site_trained(spill: Path) -> None:
    grid = _grid(NODES[:3], _numpy_trainer({}, {}, refuse=set(NODES[:3])), spill)
    result = _run(grid, 1, SecAggPlusAggregation())
    assert result.aborted is not None and "no site trained" in result.aborted
    assert result.count("refused") == 3
    assert not list(spill.iterdir())  # no directory left behind


def test_stale_and_replayed_messages_are_refused_not_crashing(spill: Path) -> None:
    updates, weights = {}, {}
    grid = _grid(NODES[:3], _numpy_trainer(updates, weights), spill)
    assert _run(grid, 1, SecAggPlusAggregation()).aborted is None
    node = NODES[0]
    for old in list(grid.sent):
        if old.metadata.dst_node_id != node:
            continue
        replay = Message(
            old.content, dst_node_id=node, message_type=old.metadata.message_type, ttl=10
        )
        replay.metadata.__dict__["_message_id"] = uuid4().hex
        handler = grid.handler(old.metadata.message_type)
        reply = handler(replay, grid.contexts[node])
        status = reply.content.config_records[RECORD_STATUS]
        assert status["refused"], old.metadata.message_type
        assert RECORD_SECAGG not in reply.content.config_records


def test_stage_handlers_import_no_torch(tmp_path: Path) -> None:
    # A whole round through the handlers in a fresh interpreter (as deployment runs them),
    # with the numpy trainer at setup: neither torch nor opacus may get imported.
    code = f"""
import sys, runpy
import fedmm.client.app  # the ClientApp as deployment loads it, for every message
from pathlib import Path
helpers = runpy.run_path({__file__!r})
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
trainer = helpers["_numpy_trainer"]({{}}, {{}})
grid = helpers["_grid"]([1, 2, 3], trainer, Path({str(tmp_path)!r}))
result = helpers["_run"](grid, 1, helpers["SecAggPlusAggregation"]())
assert result.aborted is None and result.count("trained") == 3, result.aborted
assert "torch" not in sys.modules and "opacus" not in sys.modules, "torch imported"
"""
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=120
    )


def test_run_config_keys_choose_and_parametrise_secure_aggregation() -> None:
    from fedmm.common.federation_config import ConfigError, FederationConfig

    default = FederationConfig()
    assert default.secure_aggregation
    settings = SecAggSettings.from_federation_config(default)
    assert settings.degree is None and settings.threshold is None  # 0: paper-guided default
    custom = FederationConfig.from_run_config(
        {"secagg-degree": 4, "secagg-threshold": 3, "secagg-update-clip": 0.5}
    )
    settings = SecAggSettings.from_federation_config(custom)
    assert (settings.degree, settings.threshold, settings.update_clip) == (4, 3, 0.5)
    for key, bad in [("secagg-bit-width", 4), ("secagg-update-clip", 0.0), ("secagg-threshold", 1)]:
        with pytest.raises(ConfigError, match=key):
            FederationConfig.from_run_config({key: bad})


def test_an_impossible_graph_aborts_the_round_instead_of_the_run(spill: Path) -> None:
    grid = _grid(NODES[:3], _numpy_trainer({}, {}), spill)
    result = _run(grid, 1, SecAggPlusAggregation(SecAggSettings(degree=7)))
    assert result.aborted is not None and "cannot start" in result.aborted
    assert not grid.received  # nothing was sent


def _codes(grid: InProcessGrid, message_type: str) -> list[str]:
    return [
        reply.content.config_records[RECORD_STATUS]["code"]
        for reply in grid.received
        if reply.metadata.message_type == message_type
        and reply.content.config_records[RECORD_STATUS]["refused"]
    ]


def _message_types(grid: InProcessGrid) -> set[str]:
    return {reply.metadata.message_type for reply in grid.received}


TEN = [3 + 10 * i for i in range(10)]


def test_budget_refusals_that_leave_two_sites_abort_the_round(spill: Path) -> None:
    """Defaults for 10 sites (degree 4, t = 2): 8 sites refuse on their budget. Two sites
    would reveal each other's update, so no sum is released and nobody is asked for keys."""
    updates: dict[int, np.ndarray] = {}
    grid = _grid(TEN, _numpy_trainer(updates, {}, refuse=set(TEN[:8])), spill)
    result = _run(grid, 1, SecAggPlusAggregation())
    assert result.aborted is not None
    assert "2 sites advertised keys, fewer than 3" in result.aborted
    assert result.weighted_update_sum is None and result.mean_update() is None
    assert result.count("refused") == 8 and result.count("aborted") == 2
    assert _message_types(grid) == {MESSAGE_SETUP}


def test_a_threshold_override_below_the_sites_policy_is_refused_by_every_site(
    spill: Path,
) -> None:
    """``secagg-threshold = 2`` on 20 sites (the default is degree 8, t = 3)."""
    grid = _grid([5 + 7 * i for i in range(20)], _numpy_trainer({}, {}), spill)
    result = _run(grid, 1, SecAggPlusAggregation(SecAggSettings(threshold=2)))
    assert result.aborted is not None and result.weighted_update_sum is None
    assert _codes(grid, MESSAGE_SHARE) == [RefusalCode.SECAGG_POLICY.value] * 20
    assert MESSAGE_MASKED not in _message_types(grid)


def test_a_site_below_its_own_minimum_refuses_before_training(spill: Path) -> None:
    """The site's node config asks for at least 6 sites in a sum; 5 are sampled."""
    trained: list[int] = []

    def train(msg: Message, context: Context):
        trained.append(context.node_id)
        raise AssertionError("the site must not train")

    grid = _grid(NODES, train, spill, **{"secagg-min-sites": 6})
    result = _run(grid, 1, SecAggPlusAggregation())
    assert result.aborted is not None and trained == []
    assert _codes(grid, MESSAGE_SETUP) == [RefusalCode.TOO_FEW_SITES.value] * 5


def test_a_bad_site_policy_refuses_before_training(spill: Path) -> None:
    grid = _grid(NODES, _numpy_trainer({}, {}), spill, **{"secagg-min-sites": 2})
    result = _run(grid, 1, SecAggPlusAggregation())
    assert result.aborted is not None and "no site trained" in result.aborted
    assert _codes(grid, MESSAGE_SETUP) == [RefusalCode.SECAGG_POLICY.value] * 5


def _site_context(node: int) -> Context:
    return Context(run_id=7, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _setup_message(server_round: int, arrays: ArrayRecord, sites: list[int]) -> Message:
    from fedmm.server.secagg.stages import server_start_round

    _, requests = server_start_round(
        round_id=server_round,
        site_ids=sites,
        update_length=sum(math.prod(s) for s in SHAPES.values()),
        update_clip=1.0,
        max_weight=1000,
    )
    content = RecordDict(
        {
            "arrays": arrays,
            "config": train_request(server_round),
            RECORD_SECAGG: ConfigRecord(requests[sites[0]]),
        }
    )
    msg = Message(content, dst_node_id=sites[0], message_type=MESSAGE_SETUP, ttl=10)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    return msg


def test_an_update_length_that_differs_from_the_global_model_costs_no_training() -> None:
    """The coordinator's round config claims a longer update than the global arrays hold:
    the site refuses before it trains (training would spend privacy budget for nothing)."""
    trained: list[int] = []
    arrays = _global_arrays()
    shorter = ArrayRecord({k: arrays[k] for k in list(SHAPES)[:2]})

    def train(msg, ctx):
        trained.append(ctx.node_id)
        return SiteRefusal(RefusalCode.PRIVACY_BUDGET)

    msg = _setup_message(1, shorter, sorted(NODES[:3]))
    context = _site_context(msg.metadata.dst_node_id)
    reply = run_secagg_setup(msg, context, contribute=train, integer_vector=False)
    assert reply.content.config_records[RECORD_STATUS]["code"] == RefusalCode.BAD_REQUEST.value
    assert trained == []


def test_a_replayed_setup_never_trains_a_site_twice() -> None:
    """The first setup's training ends in a refusal (for example no usable records); the
    same setup, replayed, is refused as out of order instead of training again."""
    trained: list[int] = []

    def train(msg, ctx):
        trained.append(ctx.node_id)
        return SiteRefusal(RefusalCode.NO_DATA, "no usable records")

    msg = _setup_message(4, _global_arrays(), sorted(NODES[:3]))
    context = _site_context(msg.metadata.dst_node_id)
    first = run_secagg_setup(msg, context, contribute=train, integer_vector=False)
    assert first.content.config_records[RECORD_STATUS]["code"] == RefusalCode.NO_DATA.value
    replay = run_secagg_setup(msg, context, contribute=train, integer_vector=False)
    assert replay.content.config_records[RECORD_STATUS]["code"] == RefusalCode.OUT_OF_ORDER.value
    assert trained == [msg.metadata.dst_node_id]
