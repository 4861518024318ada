"""Caches of derived personal data are encrypted at rest under a key derived from the site
secret; a tampered, moved or swapped file is detected, deleted and rebuilt, never used."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.client import site_data
from fedmm.client.deid.cache import CACHE_PURPOSE, EncryptedEntry
from fedmm.client.encrypted_cache import (
    MAGIC,
    NONCE_BYTES,
    CacheIntegrityError,
    derive_cache_key,
    read_encrypted,
    write_encrypted,
)
from fedmm.client.site_data import load_site_records
from fedmm.common.federation_config import FederationConfig
from fedmm.common.train_request import TrainRequest

SECRET = bytes(range(32))


def test_round_trip_private_file_and_nothing_in_the_clear(tmp_path: Path) -> None:
    key = derive_cache_key(SECRET, "deid-cache")
    path = tmp_path / "f.bin"
    data = b"a caption naming Grace Hopper " * 10
    write_encrypted(path, data, key, b"entry-1/f")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = path.read_bytes()
    assert blob.startswith(MAGIC) and b"Grace" not in blob and len(blob) == len(data) + 36
    assert read_encrypted(path, key, b"entry-1/f") == data
    write_encrypted(path, data, key, b"entry-1/f")
    assert path.read_bytes() != blob  # a fresh nonce every write
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left


def test_keys_are_separated_by_purpose_and_secret() -> None:
    keys = {
        derive_cache_key(SECRET, "deid-cache"),
        derive_cache_key(SECRET, "encoder-features"),
        derive_cache_key(bytes(32), "deid-cache"),
    }
    assert len(keys) == 3 and SECRET not in keys
    with pytest.raises(ValueError, match="purpose"):
        derive_cache_key(SECRET, "")


@pytest.mark.parametrize("where", [0, len(MAGIC) + 1, len(MAGIC) + NONCE_BYTES + 3, -1])
def test_any_flipped_byte_is_detected(tmp_path: Path, where: int) -> None:
    """The magic, the nonce, the ciphertext and the tag: one flipped bit anywhere fails."""
    key = derive_cache_key(SECRET, "deid-cache")
    path = tmp_path / "f.bin"
    write_encrypted(path, b"derived personal data", key, b"aad")
    blob = bytearray(path.read_bytes())
    blob[where] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheIntegrityError):
        read_encrypted(path, key, b"aad")


def test_wrong_place_wrong_key_truncation_and_absence_are_detected(tmp_path: Path) -> None:
    key = derive_cache_key(SECRET, "deid-cache")
    path = tmp_path / "f.bin"
    write_encrypted(path, b"x" * 100, key, b"entry-1/a")
    for other_key, aad in (
        (key, b"entry-1/b"),  # moved to another name
        (derive_cache_key(bytes(32), "deid-cache"), b"entry-1/a"),  # another secret
        (derive_cache_key(SECRET, "encoder-features"), b"entry-1/a"),  # another cache
    ):
        with pytest.raises(CacheIntegrityError):
            read_encrypted(path, other_key, aad)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CacheIntegrityError, match="truncated"):
        read_encrypted(path, key, b"entry-1/a")
    with pytest.raises(CacheIntegrityError, match="unreadable"):
        read_encrypted(tmp_path / "missing.bin", key, b"entry-1/a")


@pytest.fixture()
def site(tmp_path: Path) -> dict[str, str]:
    """Three images whose pixels tell them apart, and their captions."""
    site_data._memo.clear()
    root = tmp_path / "site-data"
    root.mkdir()
    lines = []
    for i in range(3):
        Image.fromarray(np.full((40, 80), 20 + 100 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a bag number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    secret = tmp_path / "site-secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    return {
        "imagefolder": str(root),
        "site-secret": str(secret),
        "deid-cache-dir": str(tmp_path / "cache"),
    }


def _request() -> TrainRequest:
    return TrainRequest.for_round(FederationConfig(), 1)


def _entry(site: dict[str, str]) -> EncryptedEntry:
    (path,) = [p for p in Path(site["deid-cache-dir"]).iterdir() if p.is_dir()]
    return EncryptedEntry(path, derive_cache_key(SECRET, CACHE_PURPOSE))


def test_a_tampered_cache_file_is_detected_deleted_and_rebuilt(
    site: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    first = load_site_records(site, _request())
    entry = _entry(site)
    tampered = entry.path / f"{entry.index['1.png']}.bin"
    blob = bytearray(tampered.read_bytes())
    blob[len(blob) // 2] ^= 0x80  # one bit of one image's ciphertext
    tampered.write_bytes(bytes(blob))
    site_data._memo.clear()  # a fresh runner: from disk
    with caplog.at_level(logging.WARNING):
        again = load_site_records(site, _request())
    assert "failed its integrity check" in caplog.text and "it was not used" in caplog.text
    assert again.captions == first.captions and np.array_equal(again.images, first.images)
    assert not tampered.exists()  # deleted: the entry was rebuilt with fresh files
    assert len(_entry(site)) == len(entry)


def test_two_valid_files_swapped_are_not_used(site: dict[str, str]) -> None:
    """Each file is bound to its place: swapping two images' ciphertexts (both valid under
    the key) would silently give records the wrong images if it were not."""
    first = load_site_records(site, _request())
    entry = _entry(site)
    a, b = (entry.path / f"{entry.index[name]}.bin" for name in ("0.png", "2.png"))
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b)
    b.write_bytes(blob_a)
    site_data._memo.clear()
    again = load_site_records(site, _request())
    assert np.array_equal(again.images, first.images)
    assert not np.array_equal(again.images[0], again.images[2])
    assert not a.exists() and not b.exists()  # the swapped entry is gone, rebuilt


def test_an_entry_of_the_unencrypted_format_is_rebuilt(site: dict[str, str]) -> None:
    load_site_records(site, _request())
    entry = _entry(site)
    described = json.loads((entry.path / "entry.json").read_text())
    (entry.path / "entry.json").write_text(json.dumps({**described, "format": 1}))
    site_data._memo.clear()
    load_site_records(site, _request())
    assert json.loads((_entry(site).path / "entry.json").read_text())["format"] == 2


def test_an_entry_past_its_retention_is_rebuilt(site: dict[str, str]) -> None:
    load_site_records(site, _request())
    entry = _entry(site)
    old_ids = set(entry.index.values())
    described = json.loads((entry.path / "entry.json").read_text())
    (entry.path / "entry.json").write_text(
        json.dumps({**described, "created": described["created"] - 8 * 86400})
    )
    site_data._memo.clear()
    load_site_records({**site, "deid-cache-retention-days": 7}, _request())
    assert not old_ids & set(_entry(site).index.values())
    with pytest.raises(site_data.SiteDataError, match="deid-cache-retention-days"):
        load_site_records({**site, "deid-cache-retention-days": 0}, _request())
