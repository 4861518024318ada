"""The site's roster signing key (a private 0600 file) and its identity in the roster."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmm.client.secagg.site_identity import SiteIdentity, load_site_identity, sign_roster_file
from fedmm.client.secagg.site_signing_key import (
    SiteSigningKeyError,
    create_site_signing_key,
    describe_site_public_key,
    load_site_signing_key,
    site_public_key,
)
from fedmm.common.secagg.roster import (
    RosterError,
    add_site,
    create_roster,
    fingerprint,
    load_roster,
    save_roster,
    verify_roster,
)


def test_a_new_key_is_private_to_the_site_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "roster-signing.pem"
    public = create_site_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert site_public_key(path) == public and len(public) == 32
    assert fingerprint(public) in describe_site_public_key(path)
    with pytest.raises(SiteSigningKeyError, match="already exists"):
        create_site_signing_key(path)
    assert site_public_key(path) == public


def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    create_site_signing_key(path)
    path.chmod(0o640)
    with pytest.raises(SiteSigningKeyError, match=f"mode 640.*chmod 600 {path}"):
        load_site_signing_key(path)


def test_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    create_site_signing_key(path)
    link = tmp_path / "link.pem"
    link.symlink_to(path)
    with pytest.raises(SiteSigningKeyError, match="symbolic link"):
        load_site_signing_key(link)


def test_the_supernode_authentication_key_is_not_a_roster_signing_key(tmp_path: Path) -> None:
    """SuperNode keys are ECDSA P-384 and registered by the coordinator itself."""
    path = tmp_path / "supernode.key"
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(SiteSigningKeyError, match="not an Ed25519 key: is it the SuperNode"):
        load_site_signing_key(path)


def test_missing_and_garbled_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SiteSigningKeyError, match="does not exist: create it"):
        load_site_signing_key(tmp_path / "none.pem")
    garbled = tmp_path / "garbled.pem"
    fd = os.open(garbled, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(SiteSigningKeyError, match="not an unencrypted PEM private key"):
        load_site_signing_key(garbled)


def _ceremony(tmp_path: Path, names: list[str]) -> tuple[Path, dict[str, Path]]:
    """Each site makes its key, the roster lists them all, each site signs the file."""
    key_files = {name: tmp_path / name / "signing.pem" for name in names}
    roster = create_roster("hospitals")
    for name, path in key_files.items():
        roster = add_site(roster, name=name, signing_key=create_site_signing_key(path))
    roster_file = tmp_path / "roster.json"
    save_roster(roster, roster_file)
    for path in key_files.values():
        sign_roster_file(roster_file=roster_file, signing_key_file=path)
    return roster_file, key_files


def test_the_ceremony_gives_every_site_its_identity(tmp_path: Path) -> None:
    roster_file, key_files = _ceremony(tmp_path, ["a", "b", "c"])
    digest = load_roster(roster_file).digest
    for name, key_file in key_files.items():
        identity = load_site_identity(
            roster_file=roster_file, signing_key_file=key_file, pinned_digest=digest
        )
        assert identity.name == name and identity.roster.size == 3
        assert "signing_key" not in repr(identity) and "PRIVATE" not in repr(identity)


def test_an_identity_needs_the_pinned_roster_and_a_listed_key(tmp_path: Path) -> None:
    roster_file, key_files = _ceremony(tmp_path, ["a", "b", "c"])
    digest = load_roster(roster_file).digest
    with pytest.raises(RosterError, match=f"{roster_file}: .*not the roster you agreed to"):
        load_site_identity(
            roster_file=roster_file, signing_key_file=key_files["a"], pinned_digest=bytes(32)
        )
    outsider = tmp_path / "outsider.pem"
    create_site_signing_key(outsider)
    with pytest.raises(RosterError, match="is not in the roster"):
        load_site_identity(roster_file=roster_file, signing_key_file=outsider, pinned_digest=digest)
    with pytest.raises(RosterError, match="is not in the roster of 'hospitals': have it added"):
        sign_roster_file(roster_file=roster_file, signing_key_file=outsider)


def test_an_identity_cannot_claim_another_sites_name(tmp_path: Path) -> None:
    roster_file, key_files = _ceremony(tmp_path, ["a", "b", "c"])
    verified = verify_roster(load_roster(roster_file))
    with pytest.raises(RosterError, match="another signing key for site 'b'"):
        SiteIdentity(name="b", signing_key=load_site_signing_key(key_files["a"]), roster=verified)
