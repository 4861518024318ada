"""The site's long-term roster signing key: an Ed25519 key in a file only the site can read.

Active-coordinator mode (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, section 6; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) needs every site to sign its round keys under a key
the coordinator does not control. This is that key. It is *not* the SuperNode
authentication key: the coordinator registers those itself, so they prove nothing to the
other sites. Its public half goes into the federation roster (``common.secagg.roster``).

The file is PKCS#8 PEM, created with mode 0600 in a directory of mode 0700 (made if missing),
never overwritten; loading refuses a file that other users can read or write, that another
user owns, that is a symbolic link, or that holds another kind of key (the SuperNode's
ECDSA key, for instance), naming the path and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.common.secagg.roster import fingerprint

KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700


class SiteSigningKeyError(ValueError):
    """The signing key file is missing, unsafe or not an Ed25519 key; says how to fix it."""


def create_site_signing_key(path: Path) -> bytes:
    """Make a fresh Ed25519 key at ``path`` (mode 0600) and return its raw public key.

    Refuses to replace an existing file: a site that loses its key must be removed from the
    roster and added again with a new one, signed by every site.
    """
    return write_site_signing_key(path, Ed25519PrivateKey.generate())


def write_site_signing_key(path: Path, key: Ed25519PrivateKey) -> bytes:
    """Write ``key`` to a new file at ``path`` (mode 0600, its directory 0700 if made) and
    return its raw public key; never overwrites (see :func:`create_site_signing_key`)."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=KEY_DIR_MODE, parents=True)
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        handle = os.open(path, flags, KEY_FILE_MODE)
    except FileExistsError:
        raise SiteSigningKeyError(
            f"{path} already exists: a site keeps one roster signing key. Use it, or move it "
            "away on purpose (the roster must then be changed and signed again)"
        ) from None
    try:
        os.fchmod(handle, KEY_FILE_MODE)  # whatever the umask
        os.write(handle, pem)
    finally:
        os.close(handle)
    return key.public_key().public_bytes_raw()


def load_site_signing_key(path: Path) -> Ed25519PrivateKey:
    """The site's signing key from ``path``, after checking the file is private to this user."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise SiteSigningKeyError(
            f"roster signing key {path} does not exist: create it at this site "
            "(create_site_signing_key), then have it added to the roster"
        ) from None
    if stat.S_ISLNK(info.st_mode):
        raise SiteSigningKeyError(f"roster signing key {path} is a symbolic link: use the file")
    if not stat.S_ISREG(info.st_mode):
        raise SiteSigningKeyError(f"roster signing key {path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise SiteSigningKeyError(
            f"roster signing key {path} belongs to another user (uid {info.st_uid}): the "
            "site's own user must own it (chown)"
        )
    if info.st_mode & 0o077:
        raise SiteSigningKeyError(
            f"roster signing key {path} has mode {stat.S_IMODE(info.st_mode):o}: other users "
            f"can read or change it. Run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise SiteSigningKeyError(
            f"roster signing key {path} is not an unencrypted PEM private key ({error})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SiteSigningKeyError(
            f"{path} holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 key: is "
            "it the SuperNode authentication key? The roster signing key is a separate key: "
            "create one with create_site_signing_key"
        )
    return key


def site_public_key(path: Path) -> bytes:
    """The raw 32-byte public key of the site's signing key (what the roster lists)."""
    return load_site_signing_key(path).public_key().public_bytes_raw()


def describe_site_public_key(path: Path) -> str:
    """The public key and its fingerprint, to hand to whoever adds the site to the roster."""
    public = site_public_key(path)
    return f"signing key: {public.hex()}\nfingerprint: {fingerprint(public)}\n"
