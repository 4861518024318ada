"""The site secret: 32 random bytes that key the site's pseudonyms.

Created on first use with :func:`secrets.token_bytes`, stored in a file readable only by its
owner (0600), never logged and never sent: nothing in this module prints, logs or puts the
secret in an exception message.

Creation is atomic: the bytes are written and flushed to a private temporary file in the same
directory, which is then hard-linked to the final name. ``os.link`` fails if the name exists,
so two processes starting at once cannot overwrite each other's secret, and no reader ever
sees a half-written file. The loser of such a race reads the winner's secret.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

#: Length of a site secret in bytes (the HMAC-SHA256 block is 64; 32 is its security level).
SITE_SECRET_BYTES = 32


def default_site_secret_path() -> Path:
    """``$XDG_CONFIG_HOME/fedmm/site-secret``, by default ``~/.config/fedmm/site-secret``."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fedmm" / "site-secret"


class SiteSecretError(RuntimeError):
    """The site secret file exists but cannot be trusted (wrong size or permissions)."""


def _check_secret_file(path: Path) -> None:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise SiteSecretError(f"site secret {path} is not a regular file")
    if info.st_mode & 0o077:
        raise SiteSecretError(
            f"site secret {path} is readable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}"
        )
    if info.st_size != SITE_SECRET_BYTES:
        raise SiteSecretError(
            f"site secret {path} has {info.st_size} bytes, expected {SITE_SECRET_BYTES}"
        )


def read_site_secret(path: Path) -> bytes:
    """The existing secret at ``path``, after checking its permissions and size."""
    path = Path(path)
    _check_secret_file(path)
    return path.read_bytes()


def _write_new_secret(path: Path) -> None:
    """Create ``path`` holding fresh random bytes, or raise FileExistsError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            data = secrets.token_bytes(SITE_SECRET_BYTES)
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # atomic; FileExistsError if another process won
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create_site_secret(path: Path) -> bytes:
    """The site secret stored at ``path``, created (0600, atomically) if it does not exist.

    The parent directory is created with mode 0700 if missing. Raises
    :class:`SiteSecretError` if an existing file has the wrong size or is readable by others.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # another process created it first
        _write_new_secret(path)
    return read_site_secret(path)
