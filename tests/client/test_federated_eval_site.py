"""A site's side of federated evaluation through the real ClientApp (``client.app.app``):
its policy may decline (a code, no text), its counts never go out in the clear, and an
evaluation task runs only in evaluate messages."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.app import app
from fedmm.common.federated_eval import EvaluationCounts
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secure_round import RECORD_SECAGG
from fedmm.common.site_task import SiteTask, task_config
from fedmm.common.train_request import TrainRequest
from fedmm.server.secagg.stages import server_start_round

NODES = [3, 5, 9]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _content(task: SiteTask, *, secagg: bool) -> RecordDict:
    fields = TrainRequest.for_round(FederationConfig(), 1).to_config()
    records = {
        "arrays": ArrayRecord({"w": Array(np.zeros((4, 5), dtype=np.float32))}),
        "config": ConfigRecord(task_config(task, fields)),
    }
    if secagg:
        _, requests = server_start_round(
            round_id=1,
            site_ids=NODES,
            update_length=EvaluationCounts.length(),
            update_clip=1.0,
            max_weight=1000,
            integer_update=True,
        )
        records[RECORD_SECAGG] = ConfigRecord(requests[NODES[0]])
    return RecordDict(records)


def _send(message_type: str, content: RecordDict, node_config: dict[str, str]) -> Message:
    msg = Message(content, dst_node_id=NODES[0], message_type=message_type, ttl=60)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(
        run_id=7, node_id=NODES[0], node_config=node_config, state=RecordDict(), run_config={}
    )
    return app(msg, context)


def _status(reply: Message) -> dict:
    return dict(reply.content.config_records["status"])


def test_a_site_whose_policy_declines_evaluation_refuses_with_a_code(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nallow-evaluation = false\n")
    node_config = {"policy-file": str(policy), "imagefolder": str(tmp_path / "absent")}
    reply = _send(
        "evaluate.secagg_setup", _content(SiteTask.FEDERATED_EVAL, secagg=True), node_config
    )
    # Only the code: no free text, no counts, no keys (the data was never even read).
    assert _status(reply) == {"refused": True, "code": "privacy-policy"}
    assert set(reply.content.keys()) == {"status"}


def test_evaluation_counts_never_go_out_in_the_clear(tmp_path: Path) -> None:
    reply = _send("evaluate", _content(SiteTask.FEDERATED_EVAL, secagg=False), {})
    assert _status(reply) == {"refused": True, "code": "privacy-policy"}
    assert not reply.content.array_records and not reply.content.metric_records


@pytest.mark.parametrize(
    ("message_type", "task"),
    [
        ("train.secagg_setup", SiteTask.FEDERATED_EVAL),
        ("evaluate.secagg_setup", SiteTask.LOCAL_DP_SGD),
        ("evaluate", SiteTask.LOCAL_DP_SGD),
    ],
)
def test_a_task_runs_only_in_its_own_kind_of_message(
    message_type: str, task: SiteTask, tmp_path: Path
) -> None:
    node_config = {"ledger-file": str(tmp_path / "ledger.json")}
    reply = _send(message_type, _content(task, secagg="secagg" in message_type), node_config)
    assert _status(reply) == {"refused": True, "code": "bad-request"}
    assert not (tmp_path / "ledger.json").exists()  # nothing trained, nothing charged


def test_the_policy_key_is_checked() -> None:
    from fedmm.client.policy_file import PolicyError
    from fedmm.client.privacy_policy import SitePrivacyPolicy

    assert not SitePrivacyPolicy.for_site({"privacy-allow-evaluation": "false"}).allow_evaluation
    assert SitePrivacyPolicy().allow_evaluation
    with pytest.raises(PolicyError, match=r"allow-evaluation.*true or false"):
        SitePrivacyPolicy.from_mapping({"allow-evaluation": 0}, source="node config")
