"""The site's authentication key pair: the format Flower's SuperNode and ``flwr supernode
register`` read, 0600, never overwritten."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from shutil import which

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmm.client.site_keys import (
    generate_site_key_pair,
    load_site_private_key,
    public_key_fingerprint,
)
from fedmm.common.key_files import KeyFileError


def test_key_pair_is_p384_openssh_and_the_private_key_is_0600(tmp_path: Path) -> None:
    pair = generate_site_key_pair(tmp_path / "keys", comment="site-a")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.public_key.stat().st_mode) == 0o644
    assert pair.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = pair.public_key.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" site-a\n")
    key = load_site_private_key(pair.private_key)
    assert key.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert public_key_fingerprint(key) == pair.fingerprint


def test_flower_reads_both_keys(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pair = generate_site_key_pair(tmp_path / "keys")
    key = load_site_private_key(pair.private_key)
    assert try_load_public_key(pair.public_key) == public_key_to_bytes(key.public_key())


@pytest.mark.skipif(which("ssh-keygen") is None, reason="no ssh-keygen")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    pair = generate_site_key_pair(tmp_path / "keys")
    shown = subprocess.run(
        ["ssh-keygen", "-lf", str(pair.public_key)], capture_output=True, text=True, check=True
    ).stdout
    assert pair.fingerprint in shown


def test_existing_keys_are_never_overwritten_and_loose_modes_are_refused(tmp_path: Path) -> None:
    pair = generate_site_key_pair(tmp_path / "keys")
    before = pair.private_key.read_bytes()
    with pytest.raises(KeyFileError, match="never overwritten"):
        generate_site_key_pair(tmp_path / "keys")
    assert pair.private_key.read_bytes() == before
    os.chmod(pair.private_key, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_site_private_key(pair.private_key)
