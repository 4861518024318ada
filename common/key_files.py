"""Writing key and certificate files safely: never over an existing file, private keys 0600.

Both sides write keys: the coordinator its CA and SuperLink keys, a site its authentication
key pair. A private key is created with ``O_CREAT | O_EXCL`` and mode 0600 in one step, so
it is never readable by others, not even for a moment, and an existing key is never
silently replaced (rotation is an explicit step: move the old file away first).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


class KeyFileError(ValueError):
    """A key file exists already, or has unsafe permissions; the message names the fix."""


def _write_new(path: Path, data: bytes, mode: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as err:
        raise KeyFileError(
            f"{path} exists already: it is never overwritten. To replace it (key "
            "rotation), move it away first, then run the command again."
        ) from err
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits of a public file's mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def write_private_file(path: Path, data: bytes) -> Path:
    """Create ``path`` (which must not exist) with mode 0600 and write ``data``."""
    return _write_new(path, data, PRIVATE_MODE)


def write_public_file(path: Path, data: bytes) -> Path:
    """Create ``path`` (which must not exist) with mode 0644 and write ``data``."""
    return _write_new(path, data, PUBLIC_MODE)


def check_private_file(path: Path, *, what: str) -> None:
    """Raise unless ``path`` is a regular file that only its owner can read or write."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError as err:
        raise KeyFileError(f"{what} {path} does not exist") from err
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{what} {path} is not a regular file")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError(
            f"{what} {path} is readable or writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): run chmod 600 {path}"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise KeyFileError(f"{what} {path} is not owned by this user")


def fingerprint(public_key_line: bytes) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key line, as ``ssh-keygen -lf`` prints."""
    blob = base64.b64decode(public_key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"
