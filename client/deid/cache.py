"""A site's on-disk cache of de-identified data, so de-identification runs once per dataset
version rather than once per round (deployment starts a fresh ClientApp process per
message).

The de-identified data is derived personal data: every file of it is encrypted at rest with
AES-256-GCM under a key derived from the site secret (``client.encrypted_cache``, purpose
``"deid-cache"``), bound to its entry and its place in it. A copy of the cache folder
without the secret reveals file counts and sizes only; a file that fails authentication
makes the whole entry be discarded and rebuilt, never used.

An entry is a directory ``<slot>-<key>`` under the cache directory (mode 0700):

- ``key`` is an HMAC-SHA256 under the site secret of the cache format, the policy, the tool
  versions, a fingerprint of the de-identification code and a digest of the data's content.
  Change any of them (a new policy, an edited caption, an upgraded detector, a new site
  secret) and the key changes: the old entry is not used. Being keyed, it lets no one test a
  guess of the data, and it holds neither the secret nor any value found.
- ``slot`` names the dataset (say, partition 3 of the benchmark, or one imagefolder path),
  also keyed: when a new version of a dataset is stored, the entries of its older versions
  are removed.

Inside an entry: ``entry.json`` (in the clear: format, creation time, policy and tool
versions, nothing of the data), ``index.bin`` (encrypted: the entry's file names, which may
themselves be personal data, each mapped to a random id) and one ``<id>.bin`` per file
(encrypted). Entries are written to a temporary directory and renamed into place, so a
reader never sees half an entry and two processes building the same entry at once both end
up with one. An entry older than the site's retention period is not used (and ``fedmm site
purge`` removes it).
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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmm.client.deid.policy import DeidPolicy
from fedmm.client.encrypted_cache import (
    CacheIntegrityError,
    derive_cache_key,
    read_encrypted,
    write_encrypted,
)
from fedmm.common.data.dataset import ImageTextDataset

logger = logging.getLogger(__name__)

#: Bump when the layout of an entry or the meaning of its content changes (2: encrypted).
CACHE_FORMAT = 2
ENTRY_FILE = "entry.json"
INDEX_FILE = "index.bin"
#: The purpose the cache's AES key is derived for (``client.encrypted_cache``).
CACHE_PURPOSE = "deid-cache"
#: Default retention of an entry (site config ``[deidentification] cache-retention-days``).
DEFAULT_RETENTION_DAYS = 30.0


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


def entry_file_aad(entry_name: str, file_id: str) -> bytes:
    """The associated data binding a file to its entry and id (``"index"`` for the index)."""
    return f"fedmm deid cache entry {entry_name} file {file_id}".encode()


class EntryWriter:
    """Adds encrypted files to an entry being built (each under a fresh random id)."""

    def __init__(self, directory: Path, entry_name: str, key: bytes) -> None:
        self._directory, self._entry_name, self._key = directory, entry_name, key
        self.index: dict[str, str] = {}
        self._replaced: list[str] = []

    def add(self, name: str, content: bytes) -> None:
        """Encrypt ``content`` as the entry's file ``name`` (a later add replaces it)."""
        file_id = secrets.token_hex(16)
        write_encrypted(  # not fsynced: a file cut short fails authentication, is rebuilt
            self._directory / f"{file_id}.bin",
            content,
            self._key,
            entry_file_aad(self._entry_name, file_id),
            durable=False,
        )
        self.drop(name)
        self.index[name] = file_id

    def drop(self, name: str) -> None:
        """Take the file ``name`` out of the entry (deleted once the index is written)."""
        file_id = self.index.pop(name, None)
        if file_id is not None:
            self._replaced.append(file_id)

    def write_index(self) -> None:
        """Write the index (durably), then delete the files it no longer lists: a crash
        leaves an orphan file at worst, never a listed file missing."""
        write_encrypted(
            self._directory / INDEX_FILE,
            json.dumps(self.index, sort_keys=True).encode(),
            self._key,
            entry_file_aad(self._entry_name, "index"),
        )
        for file_id in self._replaced:
            (self._directory / f"{file_id}.bin").unlink(missing_ok=True)
        self._replaced.clear()


class EncryptedEntry(Mapping[str, bytes]):
    """The files of one complete entry, decrypted on access. Reading a file that is missing
    or fails authentication raises :class:`CacheIntegrityError` (discard the entry)."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path, self._key = path, key
        try:
            raw = read_encrypted(path / INDEX_FILE, key, entry_file_aad(path.name, "index"))
            index = json.loads(raw)
        except ValueError as error:  # CacheIntegrityError, or JSON that cannot be parsed
            raise CacheIntegrityError(f"index: {error}") from None
        if not isinstance(index, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in index.items()
        ):
            raise CacheIntegrityError("index: not a map of file names to ids")
        self.index: dict[str, str] = index

    def __getitem__(self, name: str) -> bytes:
        file_id = self.index[name]  # KeyError: no such file in the entry
        return read_encrypted(
            self.path / f"{file_id}.bin", self._key, entry_file_aad(self.path.name, file_id)
        )

    def __contains__(self, name: object) -> bool:
        return name in self.index  # without decrypting the file

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def remove(self, names: Iterable[str]) -> int:
        """Remove the files ``names`` from the entry: the index is rewritten first (a crash
        leaves an orphan file, never a listed file missing), then the files are deleted.
        Returns how many were removed."""
        gone = [name for name in names if name in self.index]
        if not gone:
            return 0
        writer = EntryWriter(self.path, self.path.name, self._key)
        writer.index = dict(self.index)
        for name in gone:
            writer.drop(name)
        writer.write_index()
        self.index = writer.index
        return len(gone)

    def replace(self, name: str, content: bytes) -> None:
        """Put ``content`` in place of the file ``name`` (index rewritten, old file deleted)."""
        writer = EntryWriter(self.path, self.path.name, self._key)
        writer.index = dict(self.index)
        writer.add(name, content)
        writer.write_index()
        self.index = writer.index


@dataclass(frozen=True)
class EntryInfo:
    """What ``entry.json`` says of an entry (in the clear: no data, no file names)."""

    path: Path
    slot: str
    key: str
    created: float  # Unix time; the directory's modification time for older entries
    format: int

    def age_days(self, now: float | None = None) -> float:
        return ((time.time() if now is None else now) - self.created) / 86400.0


def _entry_info(path: Path) -> EntryInfo | None:
    slot, sep, key = path.name.partition("-")
    if not sep or path.name.startswith("."):
        return None
    try:
        described = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
        created = float(described.get("created", path.stat().st_mtime))
        form = int(described.get("format", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return EntryInfo(path=path, slot=slot, key=key, created=created, format=form)


class DeidCache:
    """Encrypted entries of de-identified data under one directory (see the module
    docstring); ``site_secret`` derives the entries' AES key."""

    def __init__(
        self,
        directory: Path,
        site_secret: bytes,
        *,
        retention_days: float = DEFAULT_RETENTION_DAYS,
    ) -> None:
        self.directory = ensure_private_dir(Path(directory))
        self._key = derive_cache_key(site_secret, CACHE_PURPOSE)
        self.retention_days = retention_days

    @property
    def key(self) -> bytes:
        """The entries' AES key (derived from the site secret; never written anywhere)."""
        return self._key

    def entry_path(self, slot: str, key: str) -> Path:
        return self.directory / f"{slot}-{key}"

    def entries(self) -> list[EntryInfo]:
        """Every complete entry in the directory (any slot, any format)."""
        found = (_entry_info(p) for p in sorted(self.directory.iterdir()) if p.is_dir())
        return [info for info in found if info is not None]

    def lookup(self, slot: str, key: str) -> EncryptedEntry | None:
        """The complete, current entry for ``(slot, key)``, or None. An entry of an older
        format, past the retention period, or whose index fails authentication is
        discarded (and logged): the caller rebuilds it."""
        path = self.entry_path(slot, key)
        info = _entry_info(path) if path.is_dir() else None
        if info is None:
            return None
        if info.format != CACHE_FORMAT or info.age_days() > self.retention_days:
            logger.info(
                "de-identification cache entry %s is %s: rebuilding",
                path.name,
                "of an older format" if info.format != CACHE_FORMAT else "past its retention",
            )
            self.discard(slot, key)
            return None
        try:
            return EncryptedEntry(path, self._key)
        except CacheIntegrityError as error:
            self.reject(path, error)
            return None

    def reject(self, path: Path, error: Exception) -> None:
        """Discard an entry a file of which failed to decrypt or authenticate."""
        logger.warning(
            "de-identification cache entry %s failed its integrity check (%s): deleted, "
            "rebuilding; it was not used",
            path.name,
            error,
        )
        shutil.rmtree(path, ignore_errors=True)

    def store(
        self,
        slot: str,
        key: str,
        build: Callable[[EntryWriter], None],
        *,
        description: dict[str, Any] | None = None,
    ) -> EncryptedEntry:
        """Build an entry with ``build(writer)`` (each ``writer.add(name, bytes)`` is
        encrypted as it comes), move it into place and remove the older entries of
        ``slot``. ``description`` (policy, versions: nothing found in the data) goes to
        ``entry.json`` with the creation time."""
        final = self.entry_path(slot, key)
        tmp = self.directory / f".{slot}-{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir(mode=0o700)
        try:
            writer = EntryWriter(tmp, final.name, self._key)
            build(writer)
            writer.write_index()
            (tmp / ENTRY_FILE).write_text(
                json.dumps(
                    {
                        "format": CACHE_FORMAT,
                        "created": time.time(),
                        "encryption": "AES-256-GCM, key HKDF-SHA256(site secret)",
                        **(description or {}),
                    },
                    indent=2,
                    sort_keys=True,
                )
                + "\n",
                encoding="utf-8",
            )
            try:
                tmp.rename(final)
            except OSError:  # another process stored the same entry first: keep theirs
                if not (final / ENTRY_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.remove_older(slot, keep=final)
        return EncryptedEntry(final, self._key)

    def discard(self, slot: str, key: str) -> None:
        """Remove an entry (e.g. one that could not be read back)."""
        shutil.rmtree(self.entry_path(slot, key), ignore_errors=True)

    def remove_older(self, slot: str, *, keep: Path | None) -> list[Path]:
        """Remove every entry of ``slot`` but ``keep``; returns the entries removed."""
        removed = []
        for path in self.directory.glob(f"{slot}-*"):
            if path != keep and path.is_dir():
                with contextlib.suppress(OSError):
                    shutil.rmtree(path)
                removed.append(path)
                logger.info("removed the outdated de-identification cache entry %s", path.name)
        return removed
