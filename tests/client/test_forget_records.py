"""Withdrawing a record: it never reaches a training batch, or the held-out records, in a later
round of a running site, and its de-identified copy leaves the encrypted cache; what the
withdrawals file holds says which record and when, never its content."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client import site_data
from fedmm.client.app import app
from fedmm.client.deid.cache import CACHE_PURPOSE, EncryptedEntry
from fedmm.client.deid.site_secret import SITE_SECRET_BYTES
from fedmm.client.encrypted_cache import derive_cache_key
from fedmm.client.record_withdrawals import (
    WithdrawalsError,
    append_withdrawals,
    read_withdrawals,
    withdrawn_digests,
)
from fedmm.client.site_audit import read_audit_log
from fedmm.client.site_data import load_site_split
from fedmm.client.site_tasks import federated_eval_contribution
from fedmm.client.training import MatchingDataset
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.site_refusal import SiteRefusal
from fedmm.common.site_task import SiteTask, task_config
from fedmm.common.train_request import TrainRequest
from tests.client.site_fixtures import small_colour_drawings

needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)
THINGS = ["tree", "house", "star", "boat", "cat", "lamp", "chair", "bell", "kite", "drum"]
COLOURS = ["red", "blue", "green", "yellow"]
RUN_CONFIG = {
    "image-size": "32x32",
    "image-channels": 3,
    "model-patch-size": 8,
    "model-width": 16,
    "model-vocab-buckets": 4096,
    "distractor-word-lists": "colours,positions",
    "num-distractors": 2,
    "batch-size": 4,
    "epsilon": float("inf"),  # every record is in every epoch: a batch that skips one proves it
    "num-server-rounds": 3,
    "eval-fraction": 0.3,
}


@pytest.fixture(autouse=True)
def _fresh() -> None:
    site_data._memo.clear()
    site_data._split_memo.clear()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _site(tmp_path: Path, count: int = 12) -> dict[str, str]:
    """An imagefolder of ``count`` OpenClipart drawings (RGB and transparent), each with a
    caption of its own; a fixed site secret (so its held-out split is the same every run)."""
    root = tmp_path / "records"
    root.mkdir()
    lines = []
    for i, path in enumerate(small_colour_drawings(count, modes=("RGB", "RGBA"))):
        shutil.copyfile(path, root / f"scan-{i:02d}.png")
        side = "left" if i % 2 else "right"
        text = f"a {COLOURS[i % 4]} drawing on the {side} of a {THINGS[i % 10]} {i // 10}"
        lines.append(json.dumps({"file_name": f"scan-{i:02d}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(SITE_SECRET_BYTES)))
    secret.chmod(0o600)
    return {
        "imagefolder": str(root),
        "site-secret": str(secret),
        "deid-cache-dir": str(tmp_path / "cache"),
        "ledger-file": str(tmp_path / "state" / "ledger.json"),
        "withdrawals-file": str(tmp_path / "state" / "withdrawals.jsonl"),
        "audit-log": str(tmp_path / "state" / "site-audit.jsonl"),
        "privacy-max-epsilon": float("inf"),
    }


def _message(
    node_config: dict[str, str], server_round: int, task: SiteTask
) -> tuple[Message, Context]:
    """A request of run 7 for ``task`` in ``server_round``, with a fresh model."""
    request = TrainRequest.for_round(FederationConfig.from_run_config(RUN_CONFIG), server_round)
    torch.manual_seed(0)
    model = CrossAttentionMatcher(request.model_config())
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord(task_config(task, request.to_config())),
        }
    )
    kind = "train" if task is SiteTask.LOCAL_DP_SGD else "evaluate"
    msg = Message(content, dst_node_id=3, message_type=kind, ttl=600)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(
        run_id=7, node_id=3, node_config=node_config, state=RecordDict(), run_config={}
    )
    return msg, context


def _train(node_config: dict[str, str], server_round: int) -> Message:
    """One plain training round of the real ClientApp."""
    return app(*_message(node_config, server_round, SiteTask.LOCAL_DP_SGD))


def _captions_in_batches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every caption a training batch reads (through the real dataset of the real round)."""
    seen: list[str] = []
    original = MatchingDataset.__getitem__

    def spy(self: MatchingDataset, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(self.data.captions[index])
        return original(self, index)

    monkeypatch.setattr(MatchingDataset, "__getitem__", spy)
    return seen


@needs_openclipart
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_forgotten_record_never_reaches_a_training_batch_in_a_later_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_config = _site(tmp_path)
    request = TrainRequest.for_round(FederationConfig.from_run_config(RUN_CONFIG), 1)
    split = load_site_split(node_config, request)
    assert len(split.train) >= 6 and len(split.held_out) >= 1
    metadata = [
        json.loads(line)
        for line in (Path(node_config["imagefolder"]) / "metadata.jsonl").read_text().splitlines()
    ]
    by_caption = {m["text"]: m["file_name"] for m in metadata}
    trained_marker, held_out_marker = split.train.captions[2], split.held_out.captions[0]
    assert trained_marker in by_caption and held_out_marker in by_caption  # captions kept

    seen = _captions_in_batches(monkeypatch)
    reply = _train(node_config, 1)
    assert not reply.content.config_records["status"]["refused"]
    assert trained_marker in seen  # the record was trained on: the test has teeth
    assert held_out_marker not in seen

    # The site is running (its in-process caches are warm) when the subject withdraws.
    forgotten = [by_caption[trained_marker], by_caption[held_out_marker]]
    secret = Path(node_config["site-secret"]).read_bytes()
    withdrawals = Path(node_config["withdrawals-file"])
    assert append_withdrawals(withdrawals, forgotten, secret) == forgotten

    seen.clear()
    reply = _train(node_config, 2)
    assert not reply.content.config_records["status"]["refused"]
    assert seen and trained_marker not in seen
    assert set(seen) == set(split.train.captions) - {trained_marker}
    later = load_site_split(node_config, request)
    everything = [*later.train.captions, *later.held_out.captions]
    assert trained_marker not in everything and held_out_marker not in everything
    assert len(later.train) == len(split.train) - 1
    assert len(later.held_out) == len(split.held_out) - 1

    # Gone from the encrypted cache: neither file nor metadata line is left.
    (entry_dir,) = [p for p in Path(node_config["deid-cache-dir"]).iterdir() if p.is_dir()]
    entry = EncryptedEntry(entry_dir, derive_cache_key(secret, CACHE_PURPOSE))
    assert not set(forgotten) & set(entry)
    cached = entry["metadata.jsonl"].decode()
    assert not any(name in cached for name in forgotten)
    assert len(cached.splitlines()) == len(metadata) - 2

    # The withdrawals file: which record (a keyed digest) and when; no name, no content.
    text = withdrawals.read_text()
    assert stat.S_IMODE(withdrawals.stat().st_mode) == 0o600
    assert not any(name in text for name in forgotten) and "drawing" not in text
    assert [w.withdrawn_at[-1] for w in read_withdrawals(withdrawals)] == ["Z", "Z"]

    # The audit log holds both rounds with the counts the site used.
    events = read_audit_log(Path(node_config["audit-log"])).events
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2]
    assert [e["records_used"] for e in rounds] == [len(split.train), len(split.train) - 1]
    assert [e["records_held_out"] for e in rounds] == [
        len(split.held_out),
        len(split.held_out) - 1,
    ]
    assert rounds[0]["epsilon_run"] == "inf" and rounds[1]["withdrawn_records"] == 2
    assert all(e["run_id"] == "7" and len(e["deid_policy_sha256"]) == 64 for e in rounds)

    # Federated evaluation after the withdrawal counts the held-out records without it.
    contribution = federated_eval_contribution(*_message(node_config, 3, SiteTask.FEDERATED_EVAL))
    assert not isinstance(contribution, SiteRefusal)
    assert contribution.weight == len(split.held_out) - 1
    evaluated = read_audit_log(Path(node_config["audit-log"])).events[-1]
    assert (evaluated["task"], evaluated["round"]) == ("federated_eval", 3)
    assert evaluated["records_held_out"] == len(split.held_out) - 1
    assert evaluated["records_used"] is None and evaluated["epsilon_run"] is None


@needs_openclipart
def test_a_withdrawn_record_is_never_stored_when_the_cache_is_built(tmp_path: Path) -> None:
    node_config = _site(tmp_path, count=6)
    secret = Path(node_config["site-secret"]).read_bytes()
    append_withdrawals(Path(node_config["withdrawals-file"]), ["./scan-03.png"], secret)
    request = TrainRequest.for_round(FederationConfig.from_run_config(RUN_CONFIG), 1)
    split = load_site_split(node_config, request)
    assert len(split.train) + len(split.held_out) == 5
    (entry_dir,) = [p for p in Path(node_config["deid-cache-dir"]).iterdir() if p.is_dir()]
    entry = EncryptedEntry(entry_dir, derive_cache_key(secret, CACHE_PURPOSE))
    assert "scan-03.png" not in entry and "scan-02.png" in entry
    assert b"scan-03.png" not in entry["metadata.jsonl"]


def test_withdrawals_are_keyed_to_the_site_secret_and_never_silently_dropped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "withdrawals.jsonl"
    secret, other = bytes(range(32)), bytes(32)
    assert append_withdrawals(path, ["a.png", "b.png", "a.png"], secret) == ["a.png", "b.png"]
    assert append_withdrawals(path, ["./a.png"], secret) == []  # already withdrawn
    assert len(withdrawn_digests(path, secret)) == 2
    with pytest.raises(WithdrawalsError, match="another site secret"):
        withdrawn_digests(path, other)  # a new secret cannot match them: refuse, never train
    with path.open("a") as handle:
        handle.write('{"record": "ab')  # a torn last line (a crash mid-write)
    assert len(read_withdrawals(path)) == 2
    assert append_withdrawals(path, ["c.png"], secret) == ["c.png"]  # on a line of its own
    assert len(read_withdrawals(path)) == 3 and len(path.read_text().splitlines()) == 4
    path.write_text(path.read_text() + json.dumps({"x": 1}) + "\n")
    with pytest.raises(WithdrawalsError, match="line 5 is not a withdrawal"):
        read_withdrawals(path)


def test_withdrawn_digests_are_not_the_names() -> None:
    from fedmm.client.record_withdrawals import record_digest, withdrawal_key

    key = withdrawal_key(bytes(range(32)))
    digest = record_digest("patients/jane-doe.png", key)
    assert len(digest) == 64 and "jane" not in digest
    assert digest == record_digest("./patients/jane-doe.png", key)
    assert digest != record_digest("patients/jane-doe.png", withdrawal_key(bytes(32)))
    assert np.unique([record_digest(f"{i}.png", key) for i in range(100)]).size == 100
