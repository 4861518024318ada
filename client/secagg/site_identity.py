"""Who this site is in active-coordinator mode: its roster name, signing key and the roster.

The site's stages (``client.secagg.stages``) sign its round keys and its survivor set, and
verify the other sites' signatures, against the federation roster this site pinned
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, section 6; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020). :func:`load_site_identity` reads the roster file and the signing key
file, checks that every site signed the roster, that its digest is the one the site's policy
pins (``roster-digest``) and that this site's key is in it. :func:`sign_roster_file` is what
a site runs to sign the roster after comparing fingerprints over a second channel.
:func:`identity_from_node_config` is what the site's stage handlers call: the two files come
from node config (``secagg-roster-file``, ``secagg-signing-key-file``), the pin from the
site's policy; a loaded identity is kept while neither file changes, so the simulated sites
of one process do not verify the roster again at every stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.client.secagg.site_signing_key import load_site_signing_key
from fedmm.common.secagg.roster import (
    Roster,
    RosterError,
    VerifiedRoster,
    fingerprint,
    format_digest,
    load_roster,
    save_roster,
    sign_roster,
    verify_roster,
)

#: Node config keys of the roster file and of the site's roster signing key file.
ROSTER_FILE_KEY = "secagg-roster-file"
SIGNING_KEY_FILE_KEY = "secagg-signing-key-file"


@dataclass(frozen=True)
class SiteIdentity:
    """This site's roster name and signing key, and the verified roster (secret inside)."""

    name: str
    signing_key: Ed25519PrivateKey
    roster: VerifiedRoster

    def __post_init__(self) -> None:
        listed = self.roster.roster.site(self.name).signing_key
        if listed != self.signing_key.public_key().public_bytes_raw():
            raise RosterError(f"the roster lists another signing key for site {self.name!r}")

    def __repr__(self) -> str:  # never print the key
        return f"SiteIdentity(name={self.name!r}, roster={format_digest(self.roster.digest)})"

    @classmethod
    def from_key(cls, *, signing_key: Ed25519PrivateKey, roster: VerifiedRoster) -> SiteIdentity:
        """The identity of the roster site whose key ``signing_key`` is."""
        public = signing_key.public_key().public_bytes_raw()
        name = roster.roster.name_of(public)
        if name is None:
            raise RosterError(
                f"this site's signing key (fingerprint {fingerprint(public)}) is not in the "
                f"roster {format_digest(roster.digest)}: have it added and the roster signed "
                "again, then pin the new digest"
            )
        return cls(name=name, signing_key=signing_key, roster=roster)


def load_site_identity(
    *, roster_file: Path, signing_key_file: Path, pinned_digest: bytes
) -> SiteIdentity:
    """Load and check the roster and the key (see the module doc); ``RosterError`` or
    ``SiteSigningKeyError`` name the file and the fix."""
    roster = load_roster(roster_file)
    try:
        verified = verify_roster(roster, pinned_digest=pinned_digest)
    except RosterError as error:
        raise RosterError(f"{roster_file}: {error}") from None
    return SiteIdentity.from_key(
        signing_key=load_site_signing_key(signing_key_file), roster=verified
    )


def sign_roster_file(*, roster_file: Path, signing_key_file: Path) -> Roster:
    """Add this site's signature to the roster file (rewritten atomically) and return it.

    Sign only after comparing every fingerprint (``describe_roster``) with the other sites
    over a second channel: the signature says "this is the federation I agreed to".
    """
    roster = load_roster(roster_file)
    try:
        signed = sign_roster(roster, private_key=load_site_signing_key(signing_key_file))
    except RosterError as error:
        raise RosterError(f"{roster_file}: {error}") from None
    save_roster(signed, roster_file)
    return signed


def identity_from_node_config(
    node_config: Mapping[str, Any], *, pinned_digest: bytes | None
) -> SiteIdentity | None:
    """The site's identity from the files its node config names, checked against the roster
    digest its policy pins; None when the site has no roster, key or pin configured (it then
    takes part in no active-coordinator round). A bad file raises ``RosterError`` or
    ``SiteSigningKeyError`` naming it and the fix."""
    roster_file = str(node_config.get(ROSTER_FILE_KEY, "") or "")
    key_file = str(node_config.get(SIGNING_KEY_FILE_KEY, "") or "")
    if not roster_file or not key_file or pinned_digest is None:
        return None
    return _cached_identity(
        roster_file, _file_version(roster_file), key_file, _file_version(key_file), pinned_digest
    )


def _file_version(path: str) -> tuple[int, ...]:
    """What changes when a file is replaced, rewritten or re-permissioned (the cache key)."""
    try:
        info = os.lstat(path)
    except OSError:
        return ()
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode, info.st_uid)


@lru_cache(maxsize=64)
def _cached_identity(
    roster_file: str,
    _roster_version: tuple[int, ...],
    key_file: str,
    _key_version: tuple[int, ...],
    pinned_digest: bytes,
) -> SiteIdentity:
    return load_site_identity(
        roster_file=Path(roster_file), signing_key_file=Path(key_file), pinned_digest=pinned_digest
    )
