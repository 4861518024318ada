"""A site's SuperNode authentication key pair (``fedmm site keygen DIR``).

Flower's SuperNode signs every Fleet API request with an EC private key in OpenSSH format
(what ``ssh-keygen -t ecdsa -b 384`` writes); the coordinator registers the public key
(``flwr supernode register``) and the SuperLink refuses any node whose key it does not know.
``flower-supernode`` reads the private key without a passphrase, so the file's permissions
(0600, created with O_EXCL) are its only protection. The public key is not secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmm.common.key_files import (
    KeyFileError,
    check_private_file,
    fingerprint,
    write_private_file,
    write_public_file,
)

PRIVATE_KEY = "site-auth-key"
PUBLIC_KEY = "site-auth-key.pub"


@dataclass(frozen=True)
class SiteKeyPair:
    private_key: Path
    public_key: Path
    fingerprint: str  # SHA256:... as ssh-keygen -l shows it


def generate_site_key_pair(directory: Path, *, comment: str = "fedmm-site") -> SiteKeyPair:
    """Create ``DIR/site-auth-key`` (0600) and ``DIR/site-auth-key.pub`` (EC P-384, OpenSSH)."""
    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        raise KeyFileError(
            f"{', '.join(existing)} exist(s) already and is never overwritten; to rotate the "
            "key, move both files away first (see docs/site-guide.md)"
        )
    if any(c.isspace() for c in comment):
        raise KeyFileError(f"key comment {comment!r} must not contain spaces")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private_file(private_path, private)
    write_public_file(public_path, public + b" " + comment.encode() + b"\n")
    return SiteKeyPair(private_path, public_path, fingerprint(public))


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's authentication key, checked as flower-supernode will read it."""
    check_private_file(path, what="the site's authentication key")
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(
            f"{path} is not an unencrypted OpenSSH private key ({err}); make one with "
            "`fedmm site keygen DIR`"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path} is not an EC key: Flower's node authentication needs one")
    return key


def public_key_fingerprint(private_key: ec.EllipticCurvePrivateKey) -> str:
    return fingerprint(
        private_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
