"""The federation roster: which sites exist and the Ed25519 keys they sign round keys with.

Against an actively malicious coordinator, sites must authenticate each other's round keys
without trusting the coordinator to route the right ones (Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017, section 6: a PKI that the
server does not control; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, malicious-server variant). The roster is that PKI:

- it lists every site of the federation by name with the raw 32-byte Ed25519 public key of
  its long-term *roster signing key* (``client.secagg.site_signing_key``), which is not the
  SuperNode authentication key (the coordinator registers those itself);
- its **digest** is SHA-256 over a canonical encoding of the federation name and the sorted
  site entries (signatures excluded), so that any change to the list changes it;
- every listed site signs the digest; a roster is valid only when all of them have, so no
  party (the coordinator included) can add a site or swap a key without every site signing
  the changed list again;
- each site pins the digest in its own policy (``roster-digest``) after comparing the
  fingerprints over a second channel (phone, video call, signed letter), and refuses any
  round whose roster differs.

Sites are named, not numbered: Flower node ids are assigned by the SuperLink (the
coordinator) and change when a SuperNode registers again, so the roster does not pin them.
Instead each site signs its current node id together with its round keys in every round
(``round_signatures``), and a roster entry may stand behind one node id per round only.

The file is JSON (``to_json``/``from_json``): format, federation, sites (name and hex
signing key), signatures (name -> hex). Functions here are what the site and coordinator
commands call: :func:`create_roster`, :func:`add_site`, :func:`sign_roster`,
:func:`merge_signatures`, :func:`verify_roster`, :func:`describe_roster`,
:func:`load_roster`, :func:`save_roster`.
Every error names the input and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ROSTER_FORMAT = "fedmm-roster/1"
ROSTER_LABEL = b"fedmm/roster/v1"
SIGNING_KEY_BYTES = 32
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
#: Site names: letters, digits, dot, underscore and hyphen (they appear in signed messages).
SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_ROSTER_SITES = 10_000


class RosterError(ValueError):
    """A roster, a roster file or a roster operation is invalid; the message says how to fix
    it."""


@dataclass(frozen=True)
class RosterSite:
    """One site: its name and the raw 32-byte Ed25519 public key it signs with."""

    name: str
    signing_key: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signing_key)


@dataclass(frozen=True)
class Roster:
    """The list of sites (sorted by name) and the signatures collected so far."""

    federation: str
    sites: tuple[RosterSite, ...] = ()
    signatures: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_federation(self.federation)
        names = [site.name for site in self.sites]
        if names != sorted(names):
            raise RosterError("roster sites must be sorted by name (use add_site)")
        for site in self.sites:
            _check_name(site.name)
            _check_public_key(site.signing_key, what=f"signing key of site {site.name!r}")
        if len(set(names)) != len(names):
            raise RosterError("the roster lists a site name twice: keep one entry per site")
        keys = [site.signing_key for site in self.sites]
        if len(set(keys)) != len(keys):
            raise RosterError(
                "two roster sites share one signing key: every site needs its own key"
            )
        if len(self.sites) > MAX_ROSTER_SITES:
            raise RosterError(f"a roster holds at most {MAX_ROSTER_SITES} sites")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(site.name for site in self.sites)

    def site(self, name: str) -> RosterSite:
        for site in self.sites:
            if site.name == name:
                return site
        raise RosterError(f"site {name!r} is not in the roster of {self.federation!r}")

    def name_of(self, signing_key: bytes) -> str | None:
        """The name of the site whose signing key this is, or None."""
        for site in self.sites:
            if site.signing_key == signing_key:
                return site.name
        return None

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical body (federation and sites; signatures excluded)."""
        return hashlib.sha256(ROSTER_LABEL + b"\n" + self.body_bytes()).digest()

    def body_bytes(self) -> bytes:
        body = {
            "format": ROSTER_FORMAT,
            "federation": self.federation,
            "sites": [
                {"name": site.name, "signing-key": site.signing_key.hex()} for site in self.sites
            ],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        document = {
            "format": ROSTER_FORMAT,
            "federation": self.federation,
            "sites": [
                {"name": site.name, "signing-key": site.signing_key.hex()} for site in self.sites
            ],
            "signatures": {name: self.signatures[name].hex() for name in sorted(self.signatures)},
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "roster") -> Roster:
        """Parse a roster file's text; ``source`` (the path) is named in every error."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise RosterError(f"{source} is not valid JSON ({error}): restore the file") from None
        if not isinstance(document, dict):
            raise RosterError(f"{source}: a roster is a JSON object; restore the file")
        if document.get("format") != ROSTER_FORMAT:
            raise RosterError(
                f"{source}: format is {document.get('format')!r}, expected {ROSTER_FORMAT!r}: "
                "is this a fedmm roster file?"
            )
        unknown = sorted(set(document) - {"format", "federation", "sites", "signatures"})
        if unknown:
            raise RosterError(f"{source}: unknown field(s) {unknown}; remove them")
        sites_value = document.get("sites", [])
        signatures_value = document.get("signatures", {})
        if not isinstance(sites_value, list) or not isinstance(signatures_value, dict):
            raise RosterError(f"{source}: 'sites' must be a list and 'signatures' an object")
        sites = []
        for index, entry in enumerate(sites_value):
            if not isinstance(entry, dict) or set(entry) != {"name", "signing-key"}:
                raise RosterError(
                    f"{source}: sites[{index}] must have exactly 'name' and 'signing-key'"
                )
            name = entry["name"]
            key = _hex_field(entry["signing-key"], f"{source}: signing key of sites[{index}]")
            sites.append(RosterSite(name=name, signing_key=key))
        signatures = {
            str(name): _hex_field(value, f"{source}: signature of {name!r}")
            for name, value in signatures_value.items()
        }
        try:
            return cls(
                federation=document.get("federation", ""),
                sites=tuple(sorted(sites, key=lambda site: str(site.name))),
                signatures=signatures,
            )
        except RosterError as error:
            raise RosterError(f"{source}: {error}") from None


@dataclass(frozen=True)
class VerifiedRoster:
    """A roster whose every site signed its digest; the only kind the protocol accepts."""

    roster: Roster

    @property
    def digest(self) -> bytes:
        return self.roster.digest

    @property
    def size(self) -> int:
        """N: the number of sites in the federation."""
        return len(self.roster.sites)

    def public_key(self, name: str) -> Ed25519PublicKey:
        """The signing key of ``name``; raises ``RosterError`` for a name not listed."""
        return Ed25519PublicKey.from_public_bytes(self.roster.site(name).signing_key)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.roster.names


@dataclass(frozen=True)
class SiteFingerprint:
    """What an operator compares over a second channel: name, key fingerprint, signed?"""

    name: str
    fingerprint: str
    signed: bool


def fingerprint(value: bytes) -> str:
    """SHA-256 of a public key (or a digest), as 16 groups of four hex digits."""
    text = hashlib.sha256(value).hexdigest()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def format_digest(digest: bytes) -> str:
    """The roster digest as operators pin it (64 hex digits)."""
    return digest.hex()


def parse_digest(text: str, *, source: str) -> bytes:
    """A pinned roster digest (64 hex digits, spaces allowed) from ``source``."""
    cleaned = "".join(str(text).split()).lower()
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        value = b""
    if len(value) != DIGEST_BYTES:
        raise RosterError(
            f"{source}: {text!r} is not a roster digest: use the 64 hex digits that "
            "describe_roster prints for the roster every site signed"
        )
    return value


def create_roster(federation: str) -> Roster:
    """An empty roster for the federation ``federation``."""
    return Roster(federation=federation)


def add_site(roster: Roster, *, name: str, signing_key: bytes) -> Roster:
    """The roster with one more site. Signatures are dropped: the list changed, so every
    site must sign it again."""
    _check_name(name)
    _check_public_key(signing_key, what=f"signing key of site {name!r}")
    if name in roster.names:
        raise RosterError(
            f"site {name!r} is already in the roster; to change its key, create the roster "
            "again and have every site sign it"
        )
    holder = roster.name_of(signing_key)
    if holder is not None:
        raise RosterError(
            f"the signing key given for {name!r} is already the key of {holder!r}: every site "
            "needs its own key (create one at that site)"
        )
    sites = tuple(sorted((*roster.sites, RosterSite(name, signing_key)), key=lambda s: s.name))
    return Roster(federation=roster.federation, sites=sites)


def roster_signing_message(digest: bytes) -> bytes:
    """What a site signs: the label and the roster digest."""
    return ROSTER_LABEL + b"|sign|" + digest


def sign_roster(roster: Roster, *, private_key: Ed25519PrivateKey) -> Roster:
    """The roster with the signature of the site whose key ``private_key`` is."""
    public = private_key.public_key().public_bytes_raw()
    name = roster.name_of(public)
    if name is None:
        raise RosterError(
            f"this site's signing key (fingerprint {fingerprint(public)}) is not in the roster "
            f"of {roster.federation!r}: have it added, then sign"
        )
    signature = private_key.sign(roster_signing_message(roster.digest))
    return Roster(
        federation=roster.federation,
        sites=roster.sites,
        signatures={**roster.signatures, name: signature},
    )


def merge_signatures(rosters: list[Roster]) -> Roster:
    """One roster with every signature from copies that each site signed separately. All
    copies must list exactly the same sites (the same digest)."""
    if not rosters:
        raise RosterError("no roster to merge: give the signed copies")
    digest = rosters[0].digest
    for index, other in enumerate(rosters[1:], start=1):
        if other.digest != digest:
            raise RosterError(
                f"copy {index + 1} lists other sites or keys (digest {format_digest(other.digest)}"
                f", not {format_digest(digest)}): every site must sign the same roster"
            )
    signatures: dict[str, bytes] = {}
    for copy in rosters:
        for name, signature in copy.signatures.items():
            if signatures.setdefault(name, signature) != signature:
                raise RosterError(
                    f"two copies carry different signatures of {name!r}: ask that site which "
                    "one it made"
                )
    return Roster(federation=rosters[0].federation, sites=rosters[0].sites, signatures=signatures)


def verify_roster(roster: Roster, *, pinned_digest: bytes | None = None) -> VerifiedRoster:
    """Check every signature; raise ``RosterError`` naming each site that has not signed, whose
    signature fails, or that signed without being listed, and a digest that differs from
    ``pinned_digest`` (the one this site's policy pins)."""
    if not roster.sites:
        raise RosterError(f"the roster of {roster.federation!r} lists no site: add the sites")
    digest = roster.digest
    if pinned_digest is not None and digest != pinned_digest:
        raise RosterError(
            f"the roster's digest is {format_digest(digest)}, but this site pins "
            f"{format_digest(pinned_digest)}: this is not the roster you agreed to. Compare "
            "the fingerprints with the other sites; if the roster changed legitimately, sign "
            "the new one and pin its digest (roster-digest)"
        )
    strangers = sorted(set(roster.signatures) - set(roster.names))
    if strangers:
        raise RosterError(
            f"the roster carries signatures of {strangers}, which it does not list: remove "
            "them (a site that left must be removed and the roster signed again)"
        )
    problems = []
    message = roster_signing_message(digest)
    for site in roster.sites:
        signature = roster.signatures.get(site.name)
        if signature is None:
            problems.append(f"site {site.name!r} has not signed")
            continue
        try:
            Ed25519PublicKey.from_public_bytes(site.signing_key).verify(signature, message)
        except InvalidSignature:
            problems.append(
                f"the signature of site {site.name!r} does not match this roster (it signed "
                "another version)"
            )
    if problems:
        raise RosterError(
            f"roster of {roster.federation!r} (digest {format_digest(digest)}): "
            + "; ".join(problems)
            + ": every listed site must sign this exact roster"
        )
    return VerifiedRoster(roster)


def roster_fingerprints(roster: Roster) -> list[SiteFingerprint]:
    """Every site's key fingerprint and whether its signature on this roster verifies."""
    message = roster_signing_message(roster.digest)
    out = []
    for site in roster.sites:
        signature = roster.signatures.get(site.name)
        signed = False
        if signature is not None:
            try:
                Ed25519PublicKey.from_public_bytes(site.signing_key).verify(signature, message)
                signed = True
            except InvalidSignature:
                signed = False
        out.append(SiteFingerprint(site.name, site.fingerprint, signed))
    return out


def describe_roster(roster: Roster) -> str:
    """A text to compare over a second channel: federation, digest, and per site its name,
    key fingerprint and whether it signed this exact roster."""
    rows = roster_fingerprints(roster)
    width = max([len(row.name) for row in rows] + [4])
    lines = [
        f"federation: {roster.federation}",
        f"roster digest: {format_digest(roster.digest)}",
        f"sites: {len(rows)}, signed: {sum(row.signed for row in rows)}",
        "",
        f"{'site':<{width}}  signed  signing-key fingerprint (SHA-256)",
    ]
    for row in rows:
        lines.append(f"{row.name:<{width}}  {'yes' if row.signed else 'NO ':<6}  {row.fingerprint}")
    return "\n".join(lines) + "\n"


def load_roster(path: Path) -> Roster:
    """Read a roster file; errors name the path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RosterError(
            f"roster file {path} does not exist: create it (create_roster) or copy the "
            "federation's roster there"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RosterError(f"roster file {path} cannot be read: {error}") from None
    return Roster.from_json(text, source=str(path))


def save_roster(roster: Roster, path: Path) -> None:
    """Write the roster atomically (a reader sees the old file or the new one, never half)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(roster.to_json())
        os.chmod(temporary, 0o644)  # public information: keys and signatures only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_federation(federation: Any) -> None:
    if not isinstance(federation, str) or not SITE_NAME_PATTERN.fullmatch(federation):
        raise RosterError(
            f"federation name {federation!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not SITE_NAME_PATTERN.fullmatch(name):
        raise RosterError(
            f"site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )


def _check_public_key(value: Any, *, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != SIGNING_KEY_BYTES:
        raise RosterError(
            f"{what} must be a raw Ed25519 public key of {SIGNING_KEY_BYTES} bytes (64 hex digits)"
        )
    try:
        Ed25519PublicKey.from_public_bytes(value)
    except ValueError:
        raise RosterError(f"{what} is not a valid Ed25519 public key") from None


def _hex_field(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise RosterError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise RosterError(f"{what} is not hex: restore the file") from None
