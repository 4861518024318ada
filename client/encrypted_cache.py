"""Files of derived personal data encrypted at rest: AES-256-GCM under a key from the site
secret, one file at a time.

Every cache a site writes that holds derived personal data (its de-identified records,
features computed from them) goes through :func:`write_encrypted` and
:func:`read_encrypted`:

- **Key**: HKDF-SHA256 (RFC 5869) of the site secret with ``info`` naming the cache's
  purpose (:func:`derive_cache_key`), so each cache has its own key and the site secret
  itself keys nothing but derivations. A copy of the cache folder without the site secret
  reveals nothing of the data but file sizes and counts.
- **Cipher**: AES-GCM (NIST SP 800-38D) from ``cryptography`` with a fresh random 96-bit
  nonce per write (random nonces stay far below the 2^32 messages SP 800-38D section 8.3
  allows one key).
- **Associated data**: the caller binds each file to where it belongs (its cache entry and
  its name in it): a file copied to another entry or name, an entry's file swapped with an
  older version's, a truncated or flipped byte all fail authentication.

A file that fails (:class:`CacheIntegrityError`) must be deleted and rebuilt by the caller,
never used. Files are written to a private temporary file (0600) and renamed into place, so
a reader sees the old file or the new one, never half of one.

File layout: ``MAGIC`` (8 bytes) || nonce (12 bytes) || AES-GCM ciphertext and tag.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The first bytes of every encrypted cache file (format version 1).
MAGIC = b"FMMENC\x00\x01"
NONCE_BYTES = 12
KEY_BYTES = 32
_INFO_PREFIX = b"fedmm encrypted cache v1: "


class CacheIntegrityError(ValueError):
    """An encrypted cache file is missing, truncated, tampered with, bound to another place
    or written under another key: delete it and rebuild; never use its content."""


def derive_cache_key(site_secret: bytes, purpose: str) -> bytes:
    """The 256-bit AES key of one cache: HKDF-SHA256(site secret, info = purpose).

    ``purpose`` names the cache (``"deid-cache"``, ``"encoder-features"``): two caches never
    share a key, and no key equals the secret or anything else derived from it.
    """
    if len(site_secret) < 16:
        raise ValueError("the site secret is too short to derive a cache key from")
    if not purpose:
        raise ValueError("a cache key needs a purpose naming the cache")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=_INFO_PREFIX + purpose.encode("utf-8"),
    ).derive(site_secret)


def encrypt_bytes(data: bytes, key: bytes, aad: bytes) -> bytes:
    """``MAGIC || nonce || AES-GCM(key, nonce, data, MAGIC || aad)`` with a fresh nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, MAGIC + aad)


def decrypt_bytes(blob: bytes, key: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`encrypt_bytes`'s output, or :class:`CacheIntegrityError`."""
    if len(blob) < len(MAGIC) + NONCE_BYTES + 16 or not blob.startswith(MAGIC):
        raise CacheIntegrityError("not an encrypted cache file of this format (or truncated)")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], MAGIC + aad)
    except InvalidTag:
        raise CacheIntegrityError(
            "authentication failed: the file was altered, moved from another place, or "
            "written under another site secret"
        ) from None


def write_encrypted(
    path: Path, data: bytes, key: bytes, aad: bytes, *, durable: bool = True
) -> None:
    """Encrypt ``data`` into ``path`` (0600), atomically: a private temporary file beside it,
    then renamed over ``path``. ``durable``: flushed to disk (fsync) before the rename. A
    cache whose files are rebuilt when they fail to authenticate can skip that: a file the
    power cut short is detected on read like a tampered one."""
    path = Path(path)
    blob = encrypt_bytes(data, key, aad)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_encrypted(path: Path, key: bytes, aad: bytes) -> bytes:
    """The plaintext of the file :func:`write_encrypted` wrote at ``path`` with the same key
    and ``aad``; :class:`CacheIntegrityError` when it is missing, unreadable or fails
    authentication."""
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise CacheIntegrityError(f"unreadable: {type(error).__name__}") from None
    return decrypt_bytes(blob, key, aad)
