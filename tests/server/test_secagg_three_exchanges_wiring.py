"""SecAgg+ in three exchanges: sites advertise their next round's keys at unmask.

The real ``SecAggPlusAggregation`` and the real site handlers exchange real Messages through
the in-process Grid (``tests.server.in_process_grid``). A round whose sampled sites all
advertised keys for it runs setup and share keys in one exchange (``secagg_setup_share``);
any other round falls back to four. The sums are checked against the plain sums, for
training, distributed-DP and federated-evaluation rounds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.secure_aggregation import (
    SECAGG_NEXT_KEYS_KEY,
    SECAGG_STATE_KEY,
    Contributor,
    SiteContribution,
)
from fedmm.common.federated_eval import EvaluationCounts
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secure_round import (
    MESSAGE_MASKED,
    MESSAGE_SETUP,
    MESSAGE_SETUP_SHARE,
    MESSAGE_SHARE,
    MESSAGE_UNMASK,
    RECORD_STATUS,
    flatten_update,
    metric_ranges,
)
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.common.site_task import SiteTask
from fedmm.server.aggregation import RoundAggregate, RoundRequest
from fedmm.server.federated_evaluation import federated_evaluation_for
from fedmm.server.secure_aggregation import SecAggPlusAggregation, SecAggSettings
from tests.server.in_process_grid import InProcessGrid, run_secure_round, train_request

SHAPES = {"a.weight": (30, 20), "a.bias": (20,)}
NODES = [11, 2**64 - 3, 2**63 + 5, 40, 55]
FOUR = [MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_MASKED, MESSAGE_UNMASK]
THREE = [MESSAGE_SETUP_SHARE, MESSAGE_MASKED, MESSAGE_UNMASK]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


class Trainer:
    """A numpy update per site and round instead of DP-SGD; ``refuse``: sites that decline."""

    def __init__(self) -> None:
        self.updates: dict[tuple[int, int], np.ndarray] = {}
        self.weights: dict[tuple[int, int], int] = {}
        self.refuse: set[int] = set()

    def __call__(self, msg: Message, context: Context) -> SiteContribution | SiteRefusal:
        node = context.node_id
        if node in self.refuse:
            return SiteRefusal(RefusalCode.PRIVACY_BUDGET, "test refusal")
        keys = list(msg.content.array_records["arrays"].keys())
        server_round = int(msg.content.config_records["config"]["server_round"])
        rng = np.random.default_rng([node % 2**32, server_round])
        update = flatten_update({k: rng.normal(0, 0.05, SHAPES[k]) for k in keys}, keys)
        self.updates[node, server_round] = update
        self.weights[node, server_round] = int(rng.integers(50, 500))
        return SiteContribution(
            vector=update,
            weight=self.weights[node, server_round],
            metrics={"steps": 3},
            epsilon_bound=0.5,
        )

    def plain_mean(self, sites: list[int], server_round: int) -> np.ndarray:
        weights = [self.weights[site, server_round] for site in sites]
        total = sum(
            w * np.clip(self.updates[site, server_round], -1, 1)
            for site, w in zip(sites, weights, strict=True)
        )
        return total / sum(weights)


def _arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def _grid(contribute: Contributor, tmp_path: Path, **kwargs: Any) -> InProcessGrid:
    return InProcessGrid(
        NODES, contribute=contribute, node_config={"secagg-spill-dir": str(tmp_path)}, **kwargs
    )


def _round(
    aggregation: SecAggPlusAggregation,
    grid: InProcessGrid,
    server_round: int,
    nodes: list[int] = NODES,
    next_round: int | None = None,
) -> tuple[RoundAggregate, list[str]]:
    """One round over ``nodes``; the message types the coordinator sent in it, in order."""
    grid.sent.clear()
    config = FederationConfig()
    arrays = _arrays()
    request = RoundRequest(
        round_id=server_round,
        content=RecordDict({"arrays": arrays, "config": train_request(server_round)}),
        shapes=[(key, tuple(arrays[key].shape)) for key in arrays],
        metric_ranges=metric_ranges(
            max_weight=config.secagg_max_weight,
            max_steps=config.local_epochs * -(-config.secagg_max_weight // config.batch_size),
        ),
        timeout=60.0,
        next_round_id=next_round,
    )
    result = aggregation.run_round(grid, request, node_ids=nodes)
    return result, list(dict.fromkeys(grid.sent_types()))


def _check_sum(
    result: RoundAggregate,
    aggregation: SecAggPlusAggregation,
    trainer: Trainer,
    sites: list[int],
    server_round: int,
) -> None:
    assert result.aborted is None, result.aborted
    assert sorted(aggregation.last_round.survivors) == sorted(sites)
    assert result.total_weight == sum(trainer.weights[site, server_round] for site in sites)
    mean = result.mean_update()
    assert mean is not None
    flat = np.concatenate([mean[key].reshape(-1) for key in SHAPES])
    bound = aggregation.last_round.update_error_bound / result.total_weight
    assert np.abs(flat - trainer.plain_mean(sites, server_round)).max() <= bound
    assert math.isclose(result.metric_sums["steps"] / result.total_weight, 3.0, rel_tol=1e-3)


def test_rounds_after_the_first_run_in_three_exchanges_and_sum_the_same(tmp_path: Path) -> None:
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    for server_round, exchanges in [(1, FOUR), (2, THREE), (3, THREE)]:
        result, sent = _round(aggregation, grid, server_round)
        assert sent == exchanges, server_round
        _check_sum(result, aggregation, trainer, NODES, server_round)
        assert list(aggregation.last_round.exchange_seconds) == exchanges
    # Each site keeps only its next round's private keys; the round's state is gone.
    for context in grid.contexts.values():
        records = context.state.config_records
        assert SECAGG_STATE_KEY not in records
        assert int(records[f"{SECAGG_NEXT_KEYS_KEY}-train"]["round"]) == 4
    assert not list(tmp_path.iterdir())  # no waiting update left


def test_the_setting_off_keeps_four_exchanges_and_no_keys_in_advance(tmp_path: Path) -> None:
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation(SecAggSettings(advertise_next_keys=False))
    for server_round in (1, 2):
        result, sent = _round(aggregation, grid, server_round)
        assert sent == FOUR
        _check_sum(result, aggregation, trainer, NODES, server_round)
    for context in grid.contexts.values():
        assert not any(k.startswith(SECAGG_NEXT_KEYS_KEY) for k in context.state.config_records)
    for reply in grid.replies_to(MESSAGE_UNMASK):
        assert "next_round" not in reply.content.config_records["secagg"]


def test_the_unmask_reply_advertises_public_keys_only(tmp_path: Path) -> None:
    grid = _grid(Trainer(), tmp_path)
    _round(SecAggPlusAggregation(), grid, 1)
    for reply in grid.replies_to(MESSAGE_UNMASK):
        payload = dict(reply.content.config_records["secagg"])
        node = reply.metadata.src_node_id
        stored = grid.contexts[node].state.config_records[f"{SECAGG_NEXT_KEYS_KEY}-train"]
        assert payload["next_round"] == 2
        secrets = {bytes(stored["channel_private_key"]), bytes(stored["mask_private_key"])}
        for value in payload.values():
            items = value if isinstance(value, list) else [value]
            assert not any(isinstance(item, bytes) and item in secrets for item in items)


def test_a_sampled_site_without_advertised_keys_makes_the_round_fall_back(
    tmp_path: Path,
) -> None:
    """Round 1 samples four of the five sites (fraction-train < 1): the fifth has no keys
    for round 2, so round 2 runs setup; then every site has keys for round 3."""
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    first = NODES[:4]
    result, sent = _round(aggregation, grid, 1, first)
    assert sent == FOUR
    _check_sum(result, aggregation, trainer, first, 1)
    result, sent = _round(aggregation, grid, 2)
    assert sent == FOUR
    _check_sum(result, aggregation, trainer, NODES, 2)
    result, sent = _round(aggregation, grid, 3)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, NODES, 3)


def test_keys_not_used_in_their_round_are_discarded(tmp_path: Path) -> None:
    """A site advertises keys for round 2 but is not sampled then: in round 3 it has no keys
    for round 3 (its round-2 keys are never used), so round 3 falls back and still sums."""
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    left_out = NODES[4]
    result, sent = _round(aggregation, grid, 2, NODES[:4])
    assert sent == THREE
    _check_sum(result, aggregation, trainer, NODES[:4], 2)
    stored = grid.contexts[left_out].state.config_records[f"{SECAGG_NEXT_KEYS_KEY}-train"]
    assert int(stored["round"]) == 2  # unused, and useless for any other round
    result, sent = _round(aggregation, grid, 3)
    assert sent == FOUR
    _check_sum(result, aggregation, trainer, NODES, 3)
    assert f"{SECAGG_NEXT_KEYS_KEY}-train" in grid.contexts[left_out].state.config_records
    assert (
        int(grid.contexts[left_out].state.config_records[f"{SECAGG_NEXT_KEYS_KEY}-train"]["round"])
        == 4
    )


def test_keys_for_a_later_round_survive_a_setup_in_between(tmp_path: Path) -> None:
    """Round 1 asks for keys for round 3 (the next round of its kind); round 2 runs setup
    with fresh keys, and leaves the round-3 keys alone; round 3 uses them."""
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    advertising = SecAggPlusAggregation()
    _round(advertising, grid, 1, next_round=3)
    four = SecAggPlusAggregation(SecAggSettings(advertise_next_keys=False))
    result, sent = _round(four, grid, 2)
    assert sent == FOUR
    _check_sum(result, four, trainer, NODES, 2)
    result, sent = _round(advertising, grid, 3)
    assert sent == THREE
    _check_sum(result, advertising, trainer, NODES, 3)


@pytest.mark.parametrize("fault", ["drop", "error"])
def test_a_dropout_at_unmask_leaves_no_keys_and_the_next_round_falls_back(
    tmp_path: Path, fault: str
) -> None:
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    lost = NODES[2]
    grid.fault = lambda kind, node: fault if (kind, node) == (MESSAGE_UNMASK, lost) else None
    result, sent = _round(aggregation, grid, 2)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, NODES, 2)  # its input arrived: still summed
    grid.fault = lambda kind, node: None
    result, sent = _round(aggregation, grid, 3)
    assert sent == FOUR
    _check_sum(result, aggregation, trainer, NODES, 3)
    result, sent = _round(aggregation, grid, 4)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, NODES, 4)


@pytest.mark.parametrize("stage", [MESSAGE_SETUP_SHARE, MESSAGE_MASKED])
def test_one_site_lost_in_a_three_exchange_round_the_round_completes(
    tmp_path: Path, stage: str
) -> None:
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    lost = NODES[1]
    grid.fault = lambda kind, node: "error" if (kind, node) == (stage, lost) else None
    result, sent = _round(aggregation, grid, 2)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, [n for n in NODES if n != lost], 2)


def test_a_refusal_in_a_three_exchange_round_leaves_the_site_out(tmp_path: Path) -> None:
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    trainer.refuse = {NODES[0]}
    result, sent = _round(aggregation, grid, 2)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, NODES[1:], 2)
    assert {o.node_id: o.reason for o in result.outcomes if o.status == "refused"} == {
        NODES[0]: RefusalCode.PRIVACY_BUDGET.value
    }
    assert not list(tmp_path.iterdir())


def test_a_site_that_lost_its_keys_refuses_and_joins_the_next_round_through_setup(
    tmp_path: Path,
) -> None:
    """A site whose node state was lost (a restart) has no keys for the round: it refuses
    the setup-and-share request, the others sum; it joins the next round through setup."""
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    forgetful = NODES[3]
    grid.contexts[forgetful].state.config_records.pop(f"{SECAGG_NEXT_KEYS_KEY}-train")
    result, sent = _round(aggregation, grid, 2)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, [n for n in NODES if n != forgetful], 2)
    assert (forgetful, 2) not in trainer.updates  # refused before training
    codes = {
        reply.metadata.src_node_id: reply.content.config_records[RECORD_STATUS]["code"]
        for reply in grid.replies_to(MESSAGE_SETUP_SHARE)
        if reply.content.config_records[RECORD_STATUS]["refused"]
    }
    assert codes == {forgetful: RefusalCode.OUT_OF_ORDER.value}
    result, sent = _round(aggregation, grid, 3)
    assert sent == FOUR
    _check_sum(result, aggregation, trainer, NODES, 3)


def test_a_replayed_setup_and_share_request_is_refused_without_training(tmp_path: Path) -> None:
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    _round(aggregation, grid, 2)
    (request,) = [m for m in grid.sent if m.metadata.message_type == MESSAGE_SETUP_SHARE][:1]
    node = request.metadata.dst_node_id
    trained = dict(trainer.updates)
    reply = grid.handler(MESSAGE_SETUP_SHARE)(request, grid.contexts[node])
    status = reply.content.config_records[RECORD_STATUS]
    assert status["refused"] and status["code"] == RefusalCode.OUT_OF_ORDER.value
    assert trainer.updates == trained
    # The site's keys for round 3 are untouched by the replay.
    assert (
        int(grid.contexts[node].state.config_records[f"{SECAGG_NEXT_KEYS_KEY}-train"]["round"]) == 3
    )


def test_distributed_dp_rounds_sum_integers_exactly_in_three_exchanges(tmp_path: Path) -> None:
    honest = 4
    sums: dict[tuple[int, int], np.ndarray] = {}

    def integer_step(msg: Message, context: Context) -> SiteContribution:
        server_round = int(msg.content.config_records["config"]["server_round"])
        rng = np.random.default_rng([context.node_id % 2**32, server_round])
        signed = rng.integers(-(10**6), 10**6, sum(math.prod(s) for s in SHAPES.values()))
        sums[context.node_id, server_round] = signed
        return SiteContribution(
            vector=np.mod(signed, 2**32).astype(np.uint64),
            weight=1000 + context.node_id % 97,
            metrics={"steps": 1},
            epsilon_bound=0.5,
            honest_sites=honest,
        )

    grid = _grid(integer_step, tmp_path, integer_vector=True)
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True, min_survivors=honest))
    for server_round, exchanges in [(1, FOUR), (2, THREE), (3, THREE)]:
        grid.sent.clear()
        result = run_secure_round(
            aggregation, grid, _arrays(), server_round, task=SiteTask.DISTRIBUTED_DP_STEP
        )
        assert list(dict.fromkeys(grid.sent_types())) == exchanges
        assert result.aborted is None
        flat = np.concatenate([result.weighted_update_sum[k].reshape(-1) for k in SHAPES])
        expected = sum(sums[node, server_round] for node in NODES)
        assert np.array_equal(flat, expected.astype(np.float64))


def test_a_site_refuses_a_three_exchange_round_below_its_honest_count(tmp_path: Path) -> None:
    """Distributed DP's h is known only once the task ran: in a round that skips setup the
    site checks the sites that set up against it then (round 2 assumes h = 6 of 5 sites)."""

    def integer_step(msg: Message, context: Context) -> SiteContribution:
        server_round = int(msg.content.config_records["config"]["server_round"])
        return SiteContribution(
            vector=np.zeros(sum(math.prod(s) for s in SHAPES.values()), dtype=np.uint64),
            weight=10,
            metrics={"steps": 1},
            epsilon_bound=0.5,
            honest_sites=len(NODES) + (server_round == 2),
        )

    grid = _grid(integer_step, tmp_path, integer_vector=True)
    aggregation = SecAggPlusAggregation(SecAggSettings(integer_update=True))
    first = run_secure_round(aggregation, grid, _arrays(), 1, task=SiteTask.DISTRIBUTED_DP_STEP)
    assert first.aborted is None
    grid.received.clear()
    result = run_secure_round(aggregation, grid, _arrays(), 2, task=SiteTask.DISTRIBUTED_DP_STEP)
    assert result.weighted_update_sum is None
    codes = {
        reply.metadata.src_node_id: reply.content.config_records[RECORD_STATUS]["code"]
        for reply in grid.replies_to(MESSAGE_SETUP_SHARE)
        if reply.content.config_records[RECORD_STATUS]["refused"]
    }
    assert codes == dict.fromkeys(NODES, RefusalCode.TOO_FEW_SITES.value)
    assert not grid.replies_to(MESSAGE_MASKED)
    assert not list(tmp_path.iterdir())  # nothing waits


def test_federated_evaluation_rounds_advertise_keys_for_the_next_evaluation(
    tmp_path: Path,
) -> None:
    """Evaluation sums have their own rounds (every eval-every training rounds): the keys a
    site advertises at an evaluation's unmask are for the next evaluation."""
    config = FederationConfig(num_server_rounds=6, eval_every=2)
    rng = np.random.default_rng(5)
    counts: dict[tuple[int, int], EvaluationCounts] = {}

    def evaluate(msg: Message, context: Context) -> SiteContribution:
        server_round = int(msg.content.config_records["config"]["server_round"])
        n = int(rng.integers(20, 200))
        hits = sorted(int(h) for h in rng.integers(0, n + 1, size=3))
        site = EvaluationCounts(
            records=n, i2t_hits_1=hits[0], i2t_hits_5=hits[1], i2t_hits_10=hits[2]
        )
        counts[context.node_id, server_round] = site
        return SiteContribution(
            vector=site.to_vector(), weight=site.records, metrics={}, epsilon_bound=0.0
        )

    grid = _grid(evaluate, tmp_path, integer_vector=True, result_length=EvaluationCounts.length())
    evaluation = federated_evaluation_for(config)
    assert evaluation is not None
    for server_round, exchanges in [(2, FOUR), (4, THREE), (6, THREE)]:
        grid.sent.clear()
        row = evaluation.run(
            grid, server_round=server_round, node_ids=NODES, weights={"w": torch.zeros(3)}
        )
        expected = [kind.replace("train.", "evaluate.") for kind in exchanges]
        assert list(dict.fromkeys(grid.sent_types())) == expected, server_round
        total = sum((counts[node, server_round] for node in NODES), EvaluationCounts())
        assert row["records"] == total.records and "aborted" not in row
        for key, value in total.rates().items():
            assert row[key] == value, key
    # The last evaluation asks for no keys: no round follows.
    for context in grid.contexts.values():
        assert f"{SECAGG_NEXT_KEYS_KEY}-evaluate" not in context.state.config_records


def test_advertised_keys_refused_once_serve_no_second_request_of_the_round(
    tmp_path: Path,
) -> None:
    """A site takes its advertised keys out of its state before anything else: when it
    refuses a setup-and-share request (here one whose config does not fit the model) and
    the same round is asked again, with a good config, it has no keys to use twice."""
    trainer = Trainer()
    grid = _grid(trainer, tmp_path)
    aggregation = SecAggPlusAggregation()
    _round(aggregation, grid, 1)
    target = NODES[2]
    original: dict[str, Any] = {}

    def bad_length(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind == MESSAGE_SETUP_SHARE and node == target and payload["stage"] == "setup":
            original.update(payload)
            return payload | {"update_length": payload["update_length"] + 1}
        return payload

    grid.rewrite = bad_length
    result, sent = _round(aggregation, grid, 2)
    assert sent == THREE
    _check_sum(result, aggregation, trainer, [n for n in NODES if n != target], 2)
    (request,) = [
        m
        for m in grid.sent
        if m.metadata.message_type == MESSAGE_SETUP_SHARE and m.metadata.dst_node_id == target
    ]
    request.content.config_records["secagg"] = ConfigRecord(original)
    reply = grid.handler(MESSAGE_SETUP_SHARE)(request, grid.contexts[target])
    status = reply.content.config_records[RECORD_STATUS]
    assert status["refused"] and status["code"] == RefusalCode.OUT_OF_ORDER.value
    assert (target, 2) not in trainer.updates  # it never trained for round 2
