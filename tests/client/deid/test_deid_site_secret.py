"""The site secret file: created once, 0600, atomically, and checked on every read."""

from __future__ import annotations

import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedmm.client.deid.site_secret import (
    SITE_SECRET_BYTES,
    SiteSecretError,
    load_or_create_site_secret,
    read_site_secret,
)


def test_created_once_with_owner_only_permissions(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.secret"
    old_umask = os.umask(0)  # the most permissive umask must not widen the mode
    try:
        secret = load_or_create_site_secret(path)
    finally:
        os.umask(old_umask)
    assert len(secret) == SITE_SECRET_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_site_secret(path) == secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["site.secret"]


def test_two_sites_get_different_secrets(tmp_path: Path) -> None:
    assert load_or_create_site_secret(tmp_path / "a") != load_or_create_site_secret(tmp_path / "b")


def test_concurrent_first_use_yields_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "site.secret"
    with ThreadPoolExecutor(max_workers=8) as pool:
        secrets = set(pool.map(lambda _: load_or_create_site_secret(path), range(32)))
    assert len(secrets) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["site.secret"]


def test_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.secret"
    load_or_create_site_secret(path)
    path.chmod(0o644)
    with pytest.raises(SiteSecretError, match="chmod 600"):
        read_site_secret(path)


def test_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(SiteSecretError, match="expected 32"):
        load_or_create_site_secret(path)


def test_secret_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = load_or_create_site_secret(tmp_path / "site.secret")
    assert secret.hex() not in caplog.text
    assert caplog.records == []
