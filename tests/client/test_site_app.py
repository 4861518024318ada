"""The site's ClientApp picks what it computes from the task a request declares, and its own
policy still decides: through Flower's routing of the real app (``client.app.app``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from ray import cloudpickle  # what Ray ships the ClientApp to its actors with

from fedmm.client.app import app, build_client_app
from fedmm.common.distributed_dp.plan import plan_distributed_dp
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secure_round import MESSAGE_SETUP, RECORD_SECAGG
from fedmm.common.site_task import SiteTask, task_config
from fedmm.common.train_request import TrainRequest
from fedmm.server.secagg.stages import server_start_round
from fedmm.simulations.simulated_sites import SimulatedSiteNodeConfig

NODES = [3, 5, 9]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros((4, 5), dtype=np.float32))})


def _config(task: str | None) -> ConfigRecord:
    fields = TrainRequest.for_round(FederationConfig(), 1).to_config()
    return ConfigRecord(fields if task is None else {"task": task, **fields})


def _send(message_type: str, content: RecordDict, tmp_path: Path) -> tuple[Message, Context]:
    msg = Message(content, dst_node_id=NODES[0], message_type=message_type, ttl=60)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(
        run_id=7,
        node_id=NODES[0],
        node_config={"ledger-file": str(tmp_path / "ledger.json")},
        state=RecordDict(),
        run_config={},
    )
    return app(msg, context), context


def _code(reply: Message) -> str:
    status = reply.content.config_records["status"]
    assert status["refused"]
    return str(status["code"])


def _setup(task: str, *, integer: bool, plan: bool = False) -> RecordDict:
    _, requests = server_start_round(
        round_id=1,
        site_ids=NODES,
        update_length=20,
        update_clip=1.0,
        max_weight=1000,
        integer_update=integer,
    )
    records = {
        "arrays": _arrays(),
        "config": _config(task),
        RECORD_SECAGG: ConfigRecord(requests[NODES[0]]),
    }
    if plan:
        ddp = plan_distributed_dp(
            epsilon=3.0,
            delta=1e-5,
            sample_rate=0.1,
            num_rounds=2,
            clip_norm=1.0,
            dimension=20,
            min_honest_sites=3,
        )
        records["plan"] = ConfigRecord(ddp.to_config())
    return RecordDict(records)


@pytest.mark.parametrize(("task", "code"), [(None, "bad-request"), ("fine_tune", "bad-request")])
def test_a_request_without_a_known_task_is_refused(
    task: str | None, code: str, tmp_path: Path
) -> None:
    reply, _ = _send("train", RecordDict({"arrays": _arrays(), "config": _config(task)}), tmp_path)
    assert _code(reply) == code
    assert not (tmp_path / "ledger.json").exists()  # nothing was charged or trained


def test_a_distributed_dp_share_is_never_sent_in_the_clear(tmp_path: Path) -> None:
    """Whatever the coordinator declares, the site's policy forbids a lone noise share."""
    content = RecordDict(
        {"arrays": _arrays(), "config": _config(SiteTask.DISTRIBUTED_DP_STEP.value)}
    )
    reply, _ = _send("train", content, tmp_path)
    assert _code(reply) == "privacy-policy"
    assert "update" not in reply.content.array_records
    assert not (tmp_path / "ledger.json").exists()


def test_setup_runs_the_declared_task_not_the_one_other_keys_suggest(tmp_path: Path) -> None:
    # A plan record, but the task declared is site-local DP-SGD in an integer round: the
    # site refuses before training (real and integer vectors do not mix), it does not switch
    # to the distributed step because a plan is present.
    reply, _ = _send(
        MESSAGE_SETUP, _setup(SiteTask.LOCAL_DP_SGD.value, integer=True, plan=True), tmp_path
    )
    assert _code(reply) == "bad-request"
    assert not (tmp_path / "ledger.json").exists()
    # The distributed step declared without its plan: refused by that task, before training.
    reply, _ = _send(
        MESSAGE_SETUP, _setup(SiteTask.DISTRIBUTED_DP_STEP.value, integer=True), tmp_path
    )
    assert _code(reply) == "bad-request"
    assert not (tmp_path / "ledger.json").exists()


def test_the_simulation_client_app_pickles_and_fills_each_sites_node_config(
    tmp_path: Path,
) -> None:
    """Ray ships the ClientApp to its actors with cloudpickle: the app with the simulated
    sites' node config mod must survive it and still name each site's own files."""
    mod = SimulatedSiteNodeConfig(out_dir=str(tmp_path), torch_threads=1)
    pickle.loads(pickle.dumps(mod))  # the mod itself is plain data
    shipped = cloudpickle.loads(cloudpickle.dumps(build_client_app(mods=[mod])))
    content = RecordDict({"arrays": _arrays(), "config": _config("fine_tune")})
    msg = Message(content, dst_node_id=NODES[0], message_type="train", ttl=60)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(
        run_id=7,
        node_id=NODES[0],
        node_config={"partition-id": 4, "num-partitions": 10},
        state=RecordDict(),
        run_config={},
    )
    reply = shipped(msg, context)
    assert _code(reply) == "bad-request"
    assert context.node_config["ledger-file"] == str(tmp_path / "site-ledgers" / "site-4.json")
    assert context.node_config["policy-file"] == str(tmp_path / "site-policy.toml")
    assert context.node_config["site-secret"] == str(
        tmp_path / "site-deid" / "site-4" / "site-secret"
    )
    assert context.node_config["partition-id"] == 4


def test_the_node_config_mod_refuses_to_run_outside_a_simulation(tmp_path: Path) -> None:
    shipped = build_client_app(mods=[SimulatedSiteNodeConfig(out_dir=str(tmp_path))])
    content = RecordDict({"arrays": _arrays(), "config": _config("fine_tune")})
    msg = Message(content, dst_node_id=NODES[0], message_type="train", ttl=60)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="partition-id"):
        shipped(msg, context)


def test_task_config_keeps_the_declared_task_apart_from_the_request() -> None:
    fields = TrainRequest.for_round(FederationConfig(), 2).to_config()
    config = task_config(SiteTask.LOCAL_DP_SGD, fields)
    assert config["task"] == "local_dp_sgd" and TrainRequest.from_config(config).server_round == 2
    with pytest.raises(ValueError, match="task"):
        task_config(SiteTask.LOCAL_DP_SGD, {**fields, "task": "other"})
