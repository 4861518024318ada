"""``fedmm site forget|status|audit|purge`` on a site config: what each command prints, writes
and removes, and the inputs it refuses (exit 2)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.client import site_data
from fedmm.client.site_audit import append_audit_event, audit_event
from fedmm.client.site_config import load_site_config
from fedmm.client.site_data import load_site_records
from fedmm.common.federation_config import FederationConfig
from fedmm.common.train_request import TrainRequest
from fedmm.simulations.cli import main
from tests.client.site_fixtures import GOOD, make_site


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    site_data._memo.clear()
    config = make_site(
        tmp_path / "site",
        GOOD.replace('cache-dir = "cache"', 'cache-dir = "cache"\ncache-retention-days = 7'),
    )
    data = tmp_path / "site" / "data"
    lines = []
    for i, name in enumerate(["a.png", "scans/b.png", "c.png"]):
        (data / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((30, 30), 40 * i, np.uint8)).save(data / name)
        lines.append(json.dumps({"file_name": name, "text": f"a bag number {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return config


def _load(config: Path) -> list[str]:
    site_data._memo.clear()
    node_config = load_site_config(config).node_config()
    return load_site_records(node_config, TrainRequest.for_round(FederationConfig(), 1)).captions


def _entries(config: Path) -> list[Path]:
    cache = config.parent / "cache"
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_forget_records_the_withdrawal_and_clears_the_cache(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(_load(site)) == 3  # the cache holds all three
    assert main(["site", "forget", str(site), "--file-name", "b.png"]) == 2
    err = capsys.readouterr().err
    assert "not in" in err and "b.png" in err and "nothing was recorded" in err
    names = site.parent / "names.txt"
    names.write_text("# subject request 17\nscans/b.png\n./a.png\n")
    assert main(["site", "forget", str(site), "--names-file", str(names)]) == 0
    out = capsys.readouterr().out
    assert "withdrawn 2 record(s)" in out
    assert "removed 2 record(s) from the de-identification cache" in out
    assert _load(site) == ["a bag number 2"]
    withdrawals = site.parent / "state" / "withdrawals.jsonl"
    assert stat.S_IMODE(withdrawals.stat().st_mode) == 0o600
    assert b"b.png" not in withdrawals.read_bytes()
    assert main(["site", "forget", str(site), "--file-name", "a.png"]) == 0
    assert "(1 withdrawn before)" in capsys.readouterr().out
    assert main(["site", "forget", str(site), "--file-name", "gone.png", "--allow-missing"]) == 0
    capsys.readouterr()

    assert main(["site", "status", str(site), "--json"]) == 0
    rights = json.loads(capsys.readouterr().out)["data_rights"]
    assert rights["records_withdrawn"] == 3 and rights["cache_entries"] == 1
    assert rights["cache_retention_days"] == 7 and rights["runs_served"] == 0


def test_audit_prints_and_exports_and_status_summarises(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_site_config(site)
    node = {
        "coordinator-address": "coordinator.example.org:9093",
        "coordinator-certificate-sha256": "AB:CD:EF",
    }
    for server_round in (1, 2):
        append_audit_event(
            config.audit_log,
            audit_event(
                node,
                event="round",
                run_id=42,
                server_round=server_round,
                task="local_dp_sgd",
                records_used=80,
                records_held_out=20,
                epsilon_run=0.4 * server_round,
                epsilon_lifetime=1.0,
                deid_policy_sha256="ab" * 32,
            ),
        )
    append_audit_event(
        config.audit_log,
        audit_event(
            node,
            event="refusal",
            run_id=42,
            server_round=3,
            message_type="train",
            code="privacy-budget",
        ),
    )
    assert main(["site", "audit", str(site)]) == 0
    text = capsys.readouterr().out
    assert "1 run(s) served, 3 event(s)" in text and "rounds trained    [1, 2]" in text
    assert "privacy-budget x1" in text and "AB:CD:EF" in text
    out = tmp_path / "export.json"
    assert main(["site", "audit", str(site), "--format", "json", "--output", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    exported = json.loads(out.read_text())
    assert exported["runs"][0]["epsilon_run"] == 0.8 and len(exported["events"]) == 3
    capsys.readouterr()
    assert main(["site", "status", str(site)]) == 0
    status = capsys.readouterr().out
    assert "runs served       1 (2 rounds trained, 0 evaluated)" in status
    assert "refusals          privacy-budget x1" in status
    assert "coordinator.example.org:9093" in status and "records withdrawn 0" in status


def test_purge_removes_expired_changed_and_unfinished_entries(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _load(site)
    (current,) = _entries(site)
    assert main(["site", "purge", str(site)]) == 0
    assert "removed 0, kept 1" in capsys.readouterr().out

    # Data changed since the entry was built (not yet rebuilt: no round ran since).
    metadata = site.parent / "data" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("number 2", "number 9"))
    assert main(["site", "purge", str(site), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and current.exists()
    assert main(["site", "purge", str(site)]) == 0
    out = capsys.readouterr().out
    assert "built from data, a policy, a site secret or tools that have changed" in out
    assert not current.exists()

    # An entry past the retention period, and a build a crashed process left behind.
    _load(site)
    (entry,) = _entries(site)
    described = json.loads((entry / "entry.json").read_text())
    described["created"] -= 8 * 86400
    (entry / "entry.json").write_text(json.dumps(described))
    unfinished = site.parent / "cache" / f".{entry.name}.123.abcd.tmp"
    unfinished.mkdir()
    os.utime(unfinished, (time.time() - 7200, time.time() - 7200))
    assert main(["site", "purge", str(site)]) == 0
    out = capsys.readouterr().out
    assert "past the retention period of 7 days" in out and "unfinished build" in out
    assert not entry.exists() and not unfinished.exists()


def test_forget_deletes_the_features_derived_from_the_records(site: Path) -> None:
    from fedmm.client.feature_cache import FEATURES_DIR
    from fedmm.client.site_data import load_site_split
    from fedmm.common import scattering

    site_data._memo.clear()
    site_data._split_memo.clear()
    node_config = load_site_config(site).node_config()
    run = {"model-image-encoder": "scatter-linear", "model-image-layers": 0}
    load_site_split(node_config, TrainRequest.for_round(FederationConfig.from_run_config(run), 1))
    features = site.parent / "cache" / FEATURES_DIR
    assert [p for p in features.iterdir() if p.is_dir()]  # the scattering features entry
    scattering._memo.clear()
    assert main(["site", "forget", str(site), "--file-name", "c.png"]) == 0
    assert not [p for p in features.iterdir() if p.is_dir()]
