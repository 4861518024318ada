"""A site's records are de-identified before training, under its own policy, once per
dataset version: an in-process cache, then an on-disk cache whose key changes with the
policy, the data, the tool versions and the site secret."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.client import site_data
from fedmm.client.deid.cache import CACHE_PURPOSE, EncryptedEntry, code_fingerprint
from fedmm.client.deid.policy import DeidPolicy, load_policy
from fedmm.client.deid.records import deidentify_records
from fedmm.client.encrypted_cache import derive_cache_key
from fedmm.client.site_data import load_site_records
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.federation_config import FederationConfig
from fedmm.common.train_request import TrainRequest

needs_benchmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)
PII = ["Grace Hopper", "grace@example.com", "(415) 555-0134", "2024-03-15"]
CAPTIONS = [
    "a sandal, photo by Grace Hopper",
    "a bag, contact grace@example.com or (415) 555-0134",
    "a coat on a black background, worn on 2024-03-15",
]


def _request(limit: int = 0) -> TrainRequest:
    config = FederationConfig.from_run_config({"site-records-limit": limit})
    return TrainRequest.for_round(config, 1)


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    site_data._memo.clear()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "site-data"
    root.mkdir()
    for i in range(len(CAPTIONS)):
        Image.fromarray(np.full((40, 80), 60 * i, np.uint8)).save(root / f"{i}.png")
    _write_metadata(root, CAPTIONS)
    return root


def _write_metadata(root: Path, captions: list[str]) -> None:
    lines = [json.dumps({"file_name": f"{i}.png", "text": c}) for i, c in enumerate(captions)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _node_config(tmp_path: Path, folder: Path, policy_text: str = "") -> dict[str, str]:
    policy = tmp_path / "deid.toml"
    policy.write_text(policy_text)
    return {
        "imagefolder": str(folder),
        "deid-policy": str(policy),
        "site-secret": str(tmp_path / "secret" / "site-secret"),
        "deid-cache-dir": str(tmp_path / "cache"),
    }


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def test_imagefolder_is_de_identified_and_cached_privately(folder: Path, tmp_path: Path) -> None:
    config = _node_config(tmp_path, folder)
    data = load_site_records(config, _request())
    assert data.captions[0].startswith("a sandal, photo by <PERSON_")
    assert "<EMAIL_" in data.captions[1] and "<PHONE_" in data.captions[1]
    assert data.captions[2].endswith("worn on <DATE_" + data.captions[2].split("<DATE_")[1])
    assert data.images.shape == (3, 28, 56)
    secret = Path(config["site-secret"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    cache = Path(config["deid-cache-dir"])
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (entry,) = _entries(cache)
    files = EncryptedEntry(entry, derive_cache_key(secret.read_bytes(), CACHE_PURPOSE))
    audit = json.loads(files["audit.json"])
    assert audit["pii_by_type"] == {"DATE": 1, "EMAIL": 1, "PERSON": 1, "PHONE": 1}
    assert sorted(files) == ["0.png", "1.png", "2.png", "audit.json", "metadata.jsonl"]
    # Neither the secret nor a found value is anywhere in the cache's names or files but
    # the de-identified data (which holds pseudonyms only, and is encrypted).
    key_material = [secret.read_bytes(), secret.read_bytes().hex().encode()]
    for path in [cache, *cache.rglob("*")]:
        assert not any(v.encode() in path.name.encode() for v in PII)
        if path.is_file():
            content = path.read_bytes()
            assert not any(v in content for v in key_material), path
            assert not any(value.encode() in content for value in PII), path
            assert b"a sandal" not in content and b".png" not in content, path
            if path.name != "entry.json":  # the policy (in the clear) names the types
                assert b"<PERSON_" not in content and b"PNG" not in content, path


def test_cache_hits_in_process_and_on_disk_and_is_invalidated_by_policy_and_data(
    folder: Path, tmp_path: Path
) -> None:
    config = _node_config(tmp_path, folder)
    cache = Path(config["deid-cache-dir"])
    first = load_site_records(config, _request())
    (entry,) = _entries(cache)
    assert load_site_records(config, _request()) is first  # in-process
    site_data._memo.clear()  # a fresh ClientApp process: from disk, not recomputed
    mtime = (entry / "entry.json").stat().st_mtime_ns
    again = load_site_records(config, _request())
    assert again.captions == first.captions and np.array_equal(again.images, first.images)
    assert _entries(cache) == [entry] and (entry / "entry.json").stat().st_mtime_ns == mtime

    Path(config["deid-policy"]).write_text('text_action = "redact"\n')  # new policy
    redacted = load_site_records(config, _request())
    assert redacted.captions[0] == "a sandal, photo by <PERSON>"
    (new_entry,) = _entries(cache)  # the outdated entry of this folder is gone
    assert new_entry != entry

    _write_metadata(folder, [*CAPTIONS[:2], "a coat, worn on March 3, 2021"])  # new data
    changed = load_site_records(config, _request())
    assert changed.captions[2] == "a coat, worn on <DATE>"
    assert len(_entries(cache)) == 1 and _entries(cache)[0] != new_entry


def test_a_new_site_secret_gives_a_new_entry(folder: Path, tmp_path: Path) -> None:
    config = _node_config(tmp_path, folder)
    first = load_site_records(config, _request())
    site_data._memo.clear()
    other = {**config, "site-secret": str(tmp_path / "other-secret")}
    second = load_site_records(other, _request())
    assert first.captions[0] != second.captions[0]  # pseudonyms keyed by each secret
    assert len(_entries(Path(config["deid-cache-dir"]))) == 2


def test_without_a_policy_file_the_default_policy_applies(folder: Path, tmp_path: Path) -> None:
    node_config = {
        "imagefolder": str(folder),
        "site-secret": str(tmp_path / "secret"),
        "deid-cache-dir": str(tmp_path / "cache"),
    }
    data = load_site_records(node_config, _request())
    assert len(data) == len(CAPTIONS)
    text = "\n".join(data.captions)
    for value in ("Grace Hopper", "grace@example.com", "555-0134", "2024-03-15"):
        assert value not in text
    assert "sandal" in data.captions[0] and "<PERSON_" in data.captions[0]


def test_detect_faces_is_the_policy_s_choice() -> None:
    rng = np.random.default_rng(0)
    raw = ImageTextDataset(
        images=rng.integers(0, 256, (4, 28, 56), dtype=np.uint8),
        captions=["a tee"] * 4,
        labels=np.zeros(4, dtype=np.int64),
    )
    on, report_on = deidentify_records(raw, DeidPolicy(), bytes(32))
    off, report_off = deidentify_records(raw, DeidPolicy(detect_faces=False), bytes(32))
    assert report_on.images_processed == 4 and report_off.images_processed == 0
    assert np.array_equal(on.images, raw.images) and np.array_equal(off.images, raw.images)
    assert report_on.tool_versions == report_off.tool_versions


def test_policy_files_name_a_bad_detect_faces(tmp_path: Path) -> None:
    path = tmp_path / "deid.toml"
    path.write_text("detect_faces = 1\n")
    with pytest.raises(ValueError, match="detect_faces: expected true or false"):
        load_policy(path)
    path.write_text("detect_faces = false\n")
    assert load_policy(path) == replace(DeidPolicy(), detect_faces=False)
    assert len(code_fingerprint()) == 64


@needs_benchmark
def test_simulated_site_uses_its_node_config_policy_and_its_own_secret_and_cache(
    tmp_path: Path,
) -> None:
    from fedmm.simulations.simulated_sites import SimulatedSiteNodeConfig

    (tmp_path / "site-deid-policy.toml").write_text("")
    sites = SimulatedSiteNodeConfig(out_dir=str(tmp_path))
    request = _request(limit=400)
    data = {
        pid: load_site_records(
            {"partition-id": pid, "num-partitions": 10, **sites.node_config(pid)}, request
        )
        for pid in (0, 1)
    }
    for pid in (0, 1):
        site_dir = tmp_path / "site-deid" / f"site-{pid}"
        assert stat.S_IMODE((site_dir / "site-secret").stat().st_mode) == 0o600
        assert len(_entries(site_dir / "cache")) == 1
        assert any("<PERSON_" in c for c in data[pid].captions)
    secrets = {(tmp_path / "site-deid" / f"site-{p}" / "site-secret").read_bytes() for p in (0, 1)}
    assert len(secrets) == 2


def test_a_damaged_cache_entry_is_rebuilt(folder: Path, tmp_path: Path) -> None:
    config = _node_config(tmp_path, folder)
    first = load_site_records(config, _request())
    (entry,) = _entries(Path(config["deid-cache-dir"]))
    key = derive_cache_key(Path(config["site-secret"]).read_bytes(), CACHE_PURPOSE)
    file_id = EncryptedEntry(entry, key).index["metadata.jsonl"]
    (entry / f"{file_id}.bin").unlink()
    site_data._memo.clear()
    again = load_site_records(config, _request())  # found, unreadable, rebuilt
    assert again.captions == first.captions
    assert EncryptedEntry(entry, key)["metadata.jsonl"]


def test_a_cache_inside_the_data_folder_is_refused(folder: Path, tmp_path: Path) -> None:
    config = {**_node_config(tmp_path, folder), "deid-cache-dir": str(folder / ".cache")}
    with pytest.raises(site_data.SiteDataError, match="set deid-cache-dir to a folder outside"):
        load_site_records(config, _request())


@needs_benchmark
def test_simulated_site_without_settings_is_de_identified_under_the_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr run`` of the app gives a simulated site no node config of its own: the
    benchmark's synthetic personal data must still not reach training."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    data = load_site_records({"partition-id": 3, "num-partitions": 10}, _request(limit=400))
    site_dir = tmp_path / "cache-home" / "fedmm" / "simulated-sites" / "site-3"
    assert stat.S_IMODE((site_dir / "site-secret").stat().st_mode) == 0o600
    assert len(_entries(site_dir / "cache")) == 1
    assert any("<PERSON_" in c for c in data.captions)
    assert not any("@example" in c for c in data.captions)
