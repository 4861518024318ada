"""A site's on-disk cache of de-identified data, so de-identification runs once per dataset
version rather than once per round (deployment starts a fresh ClientApp process per
message).

An entry is a directory ``<slot>-<key>`` under the cache directory (mode 0700):

- ``key`` is an HMAC-SHA256 under the site secret of the cache format, the policy, the tool
  versions, a fingerprint of the de-identification code and a digest of the data's content.
  Change any of them (a new policy, an edited caption, an upgraded detector, a new site
  secret) and the key changes: the old entry is not used. Being keyed, it lets no one test a
  guess of the data, and it holds neither the secret nor any value found.
- ``slot`` names the dataset (say, partition 3 of the benchmark, or one imagefolder path),
  also keyed: when a new version of a dataset is stored, the entries of its older versions
  are removed.

Entries are written to a temporary directory and renamed into place, so a reader never sees
half an entry and two processes building the same entry at once both end up with one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmm.client.deid.policy import DeidPolicy
from fedmm.common.data.dataset import ImageTextDataset

logger = logging.getLogger(__name__)

#: Bump when the layout of an entry or the meaning of its content changes.
CACHE_FORMAT = 1
ENTRY_FILE = "entry.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedmm/deid``, by default ``~/.cache/fedmm/deid``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedmm" / "deid"


@cache
def code_fingerprint() -> str:
    """SHA-256 of the de-identification modules' source: editing them invalidates entries
    even when the package version stays the same (an editable install)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\x00" + path.read_bytes() + b"\x00")
    return digest.hexdigest()


def secret_fingerprint(secret: bytes) -> str:
    """A keyed fingerprint of the site secret: tells two secrets apart, reveals neither."""
    return hmac.new(secret, b"fedmm deid cache: secret fingerprint", hashlib.sha256).hexdigest()


def _mac(secret: bytes, label: str, material: Any) -> str:
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    message = label.encode() + b"\x00" + text.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def records_digest(data: ImageTextDataset, secret: bytes) -> str:
    """A keyed digest of in-memory records (images, captions, labels)."""
    mac = hmac.new(secret, b"fedmm deid cache: records\x00", hashlib.sha256)
    mac.update(repr((data.images.shape, str(data.images.dtype))).encode())
    mac.update(np.ascontiguousarray(data.images).tobytes())
    mac.update(np.ascontiguousarray(data.labels, dtype=np.int64).tobytes())
    for caption in data.captions:
        encoded = caption.encode("utf-8")
        mac.update(len(encoded).to_bytes(8, "little") + encoded)
    return mac.hexdigest()


def folder_digest(root: Path, secret: bytes) -> str:
    """A keyed digest of every file under ``root``: relative paths and contents."""
    root = Path(root)
    mac = hmac.new(secret, b"fedmm deid cache: folder\x00", hashlib.sha256)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
        mac.update(len(name).to_bytes(8, "little") + name)
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            mac.update(size.to_bytes(8, "little"))
            for block in iter(lambda: handle.read(1 << 20), b""):
                mac.update(block)
    return mac.hexdigest()


def folder_signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Paths, sizes and modification times of the files under ``root``: a cheap check that a
    folder is unchanged within one process (the on-disk key uses the content)."""
    root = Path(root)
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        out.append((path.relative_to(root).as_posix(), info.st_size, info.st_mtime_ns))
    return tuple(out)


def cache_key(
    *, policy: DeidPolicy, content_digest: str, versions: dict[str, str], secret: bytes
) -> str:
    """The key of the de-identified form of some data (see the module docstring)."""
    material = {
        "format": CACHE_FORMAT,
        "policy": policy.to_dict(),
        "tool_versions": versions,
        "code": code_fingerprint(),
        "content": content_digest,
    }
    return _mac(secret, "fedmm deid cache: key", material)[:40]


def slot_name(source: Iterable[Any], secret: bytes) -> str:
    """A keyed name for one dataset (its path or partition), whatever its version."""
    return _mac(secret, "fedmm deid cache: slot", [str(part) for part in source])[:16]


def ensure_private_dir(path: Path) -> Path:
    """``path`` as a directory readable by its owner only (created 0700, or tightened)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class DeidCache:
    """Entries of de-identified data under one directory (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = ensure_private_dir(Path(directory))

    def entry_path(self, slot: str, key: str) -> Path:
        return self.directory / f"{slot}-{key}"

    def lookup(self, slot: str, key: str) -> Path | None:
        """The complete entry for ``(slot, key)``, or None."""
        path = self.entry_path(slot, key)
        return path if (path / ENTRY_FILE).is_file() else None

    def store(
        self,
        slot: str,
        key: str,
        write: Callable[[Path], None],
        *,
        description: dict[str, Any] | None = None,
    ) -> Path:
        """Build an entry with ``write(directory)``, move it into place and remove the older
        entries of ``slot``. ``description`` (policy, versions: nothing found in the data)
        goes to ``entry.json``."""
        final = self.entry_path(slot, key)
        tmp = self.directory / f".{slot}-{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir(mode=0o700)
        try:
            write(tmp)
            (tmp / ENTRY_FILE).write_text(
                json.dumps(
                    {"format": CACHE_FORMAT, **(description or {})}, indent=2, sort_keys=True
                )
                + "\n",
                encoding="utf-8",
            )
            try:
                tmp.rename(final)
            except OSError:  # another process stored the same entry first: keep theirs
                if self.lookup(slot, key) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._remove_older(slot, keep=final)
        return final

    def discard(self, slot: str, key: str) -> None:
        """Remove an entry (e.g. one that could not be read back)."""
        shutil.rmtree(self.entry_path(slot, key), ignore_errors=True)

    def _remove_older(self, slot: str, *, keep: Path) -> None:
        for path in self.directory.glob(f"{slot}-*"):
            if path != keep and path.is_dir():
                with contextlib.suppress(OSError):
                    shutil.rmtree(path)
                logger.info("removed the outdated de-identification cache entry %s", path.name)
