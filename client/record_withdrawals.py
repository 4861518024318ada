"""Records a data subject withdrew: which record and when, never its content.

``fedmm site forget CONFIG --file-name NAME`` appends one JSON line per record to the
site's withdrawals file (site config ``[data] withdrawals-file``, by default
``withdrawals.jsonl`` beside the privacy ledger; node config ``withdrawals-file``)::

    {"record": "<64 hex>", "withdrawn_at": "2026-12-06T09:30:00Z", "key_id": "<16 hex>"}

``record`` is HMAC-SHA256 of the record's ``file_name`` (as ``metadata.jsonl`` names it,
normalised like the loader does) under a key derived from the site secret with HKDF
(RFC 5869): the file says which record was withdrawn to whoever holds the secret and the
name, and nothing to anyone else (a file name may itself be personal data). ``key_id``
tells which secret keyed it: a withdrawals file written under another secret cannot be
matched, and the site then refuses to load its data rather than train on records that were
withdrawn (:class:`WithdrawalsError`).

The file is read at every data load (every round), so a running site drops a withdrawn
record from its next round on: from its training and held-out records, and from its
de-identification cache (``client.site_data``). Lines are appended with ``O_APPEND``,
flushed and fsynced one by one; the file is 0600. A torn line (a crash mid-write) was
never confirmed to the operator and is skipped with a warning; the next line starts on a
line of its own.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmm.client.site_audit import after_torn_line

logger = logging.getLogger(__name__)

#: Node config key: the site's withdrawals file.
WITHDRAWALS_FILE = "withdrawals-file"
DEFAULT_NAME = "withdrawals.jsonl"
_INFO = b"fedmm record withdrawals v1"
METADATA_FILE = "metadata.jsonl"


class WithdrawalsError(ValueError):
    """The withdrawals file cannot be used as it is; the message names the fix."""


@dataclass(frozen=True)
class Withdrawal:
    record: str  # keyed digest of the record's file name
    withdrawn_at: str  # ISO 8601, UTC
    key_id: str  # which site secret keyed ``record``

    def to_dict(self) -> dict[str, str]:
        return {"record": self.record, "withdrawn_at": self.withdrawn_at, "key_id": self.key_id}


def withdrawal_key(site_secret: bytes) -> bytes:
    """The key of the record digests: HKDF-SHA256(site secret, info naming this use)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(site_secret)


def key_id(key: bytes) -> str:
    """A public name of a withdrawal key: tells two secrets apart, reveals neither."""
    return hmac.new(key, b"key id", "sha256").hexdigest()[:16]


def normalised_file_name(file_name: str) -> str:
    """``file_name`` as the imagefolder loader keys records (``./a.png`` -> ``a.png``)."""
    return str(PurePosixPath(file_name.strip()))


def record_digest(file_name: str, key: bytes) -> str:
    """The keyed digest that stands for the record ``file_name`` in the withdrawals file."""
    name = normalised_file_name(file_name).encode("utf-8", "surrogateescape")
    return hmac.new(key, b"record\x00" + name, "sha256").hexdigest()


def withdrawals_path(node_config: Mapping[str, Any]) -> Path | None:
    """The site's withdrawals file: node config ``withdrawals-file`` (a deployed site's
    config always names it: ``client.site_config``); None for a site without one."""
    if WITHDRAWALS_FILE in node_config:
        return Path(str(node_config[WITHDRAWALS_FILE]))
    return None


def read_withdrawals(path: Path) -> list[Withdrawal]:
    """Every withdrawal in ``path`` (none when it does not exist). A torn line (not JSON: a
    crash mid-write, never confirmed to the operator) is skipped with a warning; a JSON line
    that is not a withdrawal is a :class:`WithdrawalsError`."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("withdrawals file %s: torn line %d skipped (a crash)", path, number)
            continue
        try:
            out.append(
                Withdrawal(str(entry["record"]), str(entry["withdrawn_at"]), str(entry["key_id"]))
            )
        except (KeyError, TypeError):
            raise WithdrawalsError(
                f"withdrawals file {path}: line {number} is not a withdrawal; never edit the "
                "file by hand (restore it from a backup)"
            ) from None
    return out


def withdrawn_digests(path: Path | None, site_secret: bytes) -> frozenset[str]:
    """The digests of every record withdrawn at this site; :class:`WithdrawalsError` when
    some were recorded under another site secret (they could not be matched)."""
    if path is None:
        return frozenset()
    entries = read_withdrawals(path)
    mine = key_id(withdrawal_key(site_secret))
    foreign = [w for w in entries if w.key_id != mine]
    if foreign:
        raise WithdrawalsError(
            f"withdrawals file {path}: {len(foreign)} withdrawal(s) were recorded under "
            "another site secret and cannot be matched to records; restore that secret, or "
            "record them again with `fedmm site forget` under this one (and keep the old "
            "file as the record of when they were made)"
        )
    return frozenset(w.record for w in entries)


def append_withdrawals(
    path: Path, file_names: Iterable[str], site_secret: bytes, *, now: datetime | None = None
) -> list[str]:
    """Record ``file_names`` as withdrawn (those not withdrawn already); returns the names
    recorded. Each line is appended, flushed and fsynced before the next."""
    key = withdrawal_key(site_secret)
    already = withdrawn_digests(path, site_secret)
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    recorded = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        for name in file_names:
            digest = record_digest(name, key)
            if digest in already:
                continue
            line = json.dumps(Withdrawal(digest, when, key_id(key)).to_dict(), sort_keys=True)
            os.write(fd, after_torn_line(fd) + (line + "\n").encode())
            os.fsync(fd)
            already |= {digest}
            recorded.append(normalised_file_name(name))
    finally:
        os.close(fd)
    return recorded


def metadata_file_names(metadata: bytes) -> list[str]:
    """The ``file_name`` of every well-formed line of a ``metadata.jsonl`` (normalised)."""
    names = []
    for line in metadata.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            names.append(normalised_file_name(entry["file_name"]))
    return names


def without_withdrawn_lines(metadata: bytes, withdrawn: frozenset[str], key: bytes) -> bytes:
    """``metadata.jsonl`` without the lines that name a withdrawn record (other lines,
    malformed ones included, kept byte for byte for the loader to judge)."""
    kept = []
    for line in metadata.split(b"\n"):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry = None
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if isinstance(name, str) and record_digest(name, key) in withdrawn:
            continue
        kept.append(line)
    return b"\n".join(kept)


def withdrawn_files(names: Iterable[str], withdrawn: frozenset[str], key: bytes) -> list[str]:
    """The names (relative paths in an imagefolder) that are withdrawn records' files."""
    return [name for name in names if record_digest(name, key) in withdrawn]
