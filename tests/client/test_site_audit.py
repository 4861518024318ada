"""The site's audit log: every event written before a crash survives it, a torn line costs
only itself, and every refusal the real ClientApp sends is in it with its public code."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.app import app
from fedmm.client.site_audit import (
    EVENT_REFUSAL,
    EVENT_ROUND,
    append_audit_event,
    audit_event,
    audit_text,
    read_audit_log,
    summarise_runs,
)
from fedmm.common.federation_config import FederationConfig
from fedmm.common.site_task import SiteTask, task_config
from fedmm.common.train_request import TrainRequest

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fedmm.client.site_audit import append_audit_event, audit_event

    path = Path(sys.argv[1])
    node = {"coordinator-address": "10.0.0.5:9093"}
    for i in range(1_000_000):
        append_audit_event(path, audit_event(
            node, event="round", run_id=2**64 - 5, server_round=i, task="local_dp_sgd",
            records_used=100, records_held_out=20, epsilon_run=0.01 * i,
        ))
        print(i, flush=True)  # confirmed: written and fsynced
    """
)


def test_every_event_confirmed_before_a_crash_survives_it(tmp_path: Path) -> None:
    """A site process killed (SIGKILL) in the middle of a run loses no event it wrote."""
    log = tmp_path / "state" / "site-audit.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(log)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    confirmed = -1
    try:
        for line in writer.stdout:
            confirmed = int(line)
            if confirmed >= 40:
                break
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL and confirmed >= 40
    audit = read_audit_log(log)
    rounds = [e["round"] for e in audit.events]
    assert rounds[: confirmed + 1] == list(range(confirmed + 1))  # nothing lost, in order
    assert audit.unreadable_lines == 0
    assert all(e["run_id"] == str(2**64 - 5) for e in audit.events)  # uint64 kept exact
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    (run,) = summarise_runs(audit.events)
    assert run.rounds_trained == rounds and run.coordinator_address == "10.0.0.5:9093"

    # A torn line (a crash inside a write) costs that line only: the next event starts on a
    # line of its own.
    with log.open("ab") as handle:
        handle.write(b'{"event": "round", "ro')
    append_audit_event(log, audit_event({}, event="refusal", run_id=9, server_round=1, code="x"))
    after = read_audit_log(log)
    assert after.unreadable_lines == 1
    assert after.events[-1]["run_id"] == "9" and len(after.events) == len(audit.events) + 1


def _send(message_type: str, content: RecordDict, node_config: dict[str, str]) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 11, 1, 1
    msg = Message(content, dst_node_id=3, message_type=message_type, ttl=60)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(
        run_id=11, node_id=3, node_config=node_config, state=RecordDict(), run_config={}
    )
    return app(msg, context)


def test_every_refusal_of_the_client_app_is_audited_with_its_code(tmp_path: Path) -> None:
    log = tmp_path / "site-audit.jsonl"
    node_config = {
        "ledger-file": str(tmp_path / "ledger.json"),
        "audit-log": str(log),
        "coordinator-address": "coordinator.example.org:9093",
        "coordinator-certificate-sha256": "AB:CD",
    }
    fields = TrainRequest.for_round(FederationConfig(), 4).to_config()
    arrays = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    # Federated evaluation asked in the clear: refused (its counts go out only in a sum).
    evaluate = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord(task_config(SiteTask.FEDERATED_EVAL, fields)),
        }
    )
    reply = _send("evaluate", evaluate, node_config)
    assert reply.content.config_records["status"]["refused"]
    # A request without a task: refused as a bad request.
    reply = _send(
        "train", RecordDict({"arrays": arrays, "config": ConfigRecord(fields)}), node_config
    )
    assert reply.content.config_records["status"]["code"] == "bad-request"
    events = read_audit_log(log).events
    assert [(e["event"], e["message_type"], e["round"]) for e in events] == [
        (EVENT_REFUSAL, "evaluate", 4),
        (EVENT_REFUSAL, "train", 4),
    ]
    assert [e["code"] for e in events] == ["privacy-policy", "bad-request"]
    # The reasons stay at the site, in its audit log; the replies carry the codes only.
    assert all(e["reason"] for e in events), events
    assert "only inside a secure sum" in events[0]["reason"]
    assert "declares no task" in events[1]["reason"]
    for reason in (e["reason"] for e in events):
        assert reason not in json.dumps(dict(reply.content.config_records["status"]))
    assert all(e["coordinator_certificate_sha256"] == "AB:CD" for e in events)
    text = audit_text(read_audit_log(log))
    assert "bad-request x1, privacy-policy x1" in text and "coordinator.example.org" in text

    # A site without an audit log writes none.
    _send("train", RecordDict({"arrays": arrays, "config": ConfigRecord(fields)}), {})
    assert [p.name for p in tmp_path.iterdir()] == ["site-audit.jsonl"]


def test_the_summary_of_a_run_counts_rounds_records_epsilon_and_refusals() -> None:
    node = {"coordinator-address": "c:1", "coordinator-certificate-sha256": "AA"}
    events = [
        audit_event(
            node,
            event=EVENT_ROUND,
            run_id=5,
            server_round=1,
            task="local_dp_sgd",
            records_used=80,
            records_held_out=20,
            epsilon_run=0.5,
            epsilon_lifetime=1.5,
            deid_policy_sha256="d1",
        ),
        audit_event(node, event=EVENT_REFUSAL, run_id=5, server_round=2, code="privacy-budget"),
        audit_event(
            node,
            event=EVENT_ROUND,
            run_id=5,
            server_round=2,
            task="federated_eval",
            records_used=None,
            records_held_out=20,
        ),
        audit_event(
            node,
            event=EVENT_ROUND,
            run_id=6,
            server_round=1,
            task="local_dp_sgd",
            records_used=79,
            records_held_out=20,
            epsilon_run=float("inf"),
        ),
    ]
    events = [json.loads(json.dumps(e)) for e in events]  # as read back from the file
    first, second = summarise_runs(events)
    assert (first.run_id, first.rounds_trained, first.rounds_evaluated) == ("5", [1], [2])
    assert (first.records_used, first.epsilon_run, first.epsilon_lifetime) == (80, 0.5, 1.5)
    assert first.refusals == {"privacy-budget": 1} and first.deid_policy_sha256 == ["d1"]
    assert second.epsilon_run == "inf" and second.records_used == 79
