"""The roster ceremony through ``fedmm site roster-key`` and ``fedmm site roster ...``, and
the site config keys that point a site at its roster and key."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.site_identity import (
    ROSTER_FILE_KEY,
    SIGNING_KEY_FILE_KEY,
    identity_from_node_config,
)
from fedmm.simulations.cli import main


def _fedmm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["site", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _ceremony(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """Three sites make keys, one collects, all sign; returns the roster and its digest."""
    roster = tmp_path / "roster.json"
    assert _fedmm(capsys, "roster", "create", str(roster), "--federation", "demo")[0] == 0
    for site in ("a", "b", "c"):
        code, out, _ = _fedmm(capsys, "roster-key", str(tmp_path / site / "roster-key"))
        assert code == 0 and "fingerprint:" in out
        public = re.search(r"signing key: ([0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
        assert _fedmm(capsys, "roster", "add", str(roster), "--name", site, "--key", public)[0] == 0
    for site in ("a", "b", "c"):
        key = str(tmp_path / site / "roster-key")
        assert _fedmm(capsys, "roster", "sign", str(roster), "--key", key)[0] == 0
    code, out, _ = _fedmm(
        capsys, "roster", "verify", str(roster), "--key", str(tmp_path / "a" / "roster-key")
    )
    assert code == 0 and "listed as a" in out
    digest = re.search(r'roster-digest = "([0-9a-f]{64})"', out).group(1)  # type: ignore[union-attr]
    return roster, digest


def test_the_ceremony_makes_a_roster_each_site_can_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roster, digest = _ceremony(tmp_path, capsys)
    key = tmp_path / "b" / "roster-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    _, shown, _ = _fedmm(capsys, "roster", "show", str(roster))
    assert f"roster digest: {digest}" in shown and "signed: 3" in shown
    assert "PRIVATE" not in roster.read_text()  # public keys and signatures only
    policy = ClientSecAggPolicy(require_active_coordinator=True, roster_digest=digest)
    identity = identity_from_node_config(
        {ROSTER_FILE_KEY: str(roster), SIGNING_KEY_FILE_KEY: str(key)},
        pinned_digest=policy.pinned_roster_digest,
    )
    assert identity is not None and identity.name == "b"


def test_a_roster_changed_after_signing_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator distributes the roster but cannot forge it: a site it adds drops every
    signature, and the new digest is not the pinned one."""
    roster, digest = _ceremony(tmp_path, capsys)
    _, out, _ = _fedmm(capsys, "roster-key", str(tmp_path / "intruder" / "key"))
    public = re.search(r"signing key: ([0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    code, out, _ = _fedmm(capsys, "roster", "add", str(roster), "--name", "x", "--key", public)
    assert code == 0 and "3 signature(s) dropped" in out
    _fedmm(capsys, "roster", "sign", str(roster), "--key", str(tmp_path / "intruder" / "key"))
    code, _, err = _fedmm(capsys, "roster", "verify", str(roster), "--digest", digest)
    assert code == 2 and "this is not the roster you agreed to" in err


def test_roster_key_never_overwrites_and_refuses_a_readable_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k" / "roster-key"
    assert _fedmm(capsys, "roster-key", str(key))[0] == 0
    code, _, err = _fedmm(capsys, "roster-key", str(key))
    assert code == 2 and "already exists" in err
    key.chmod(0o644)
    code, _, err = _fedmm(capsys, "roster-key", str(key), "--show")
    assert code == 2 and "chmod 600" in err


def test_site_config_points_at_the_roster_and_checks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmm.client.site_config import _check_roster, load_site_config
    from tests.client.site_fixtures import GOOD

    roster, digest = _ceremony(tmp_path, capsys)
    site = tmp_path / "site"
    site.mkdir()
    (site / "privacy-policy.toml").write_text("[privacy]\nmax-epsilon = 2.0\n")
    text = GOOD.replace(
        "[secure-aggregation]\n",
        "[secure-aggregation]\nrequire-active-coordinator = true\n"
        f'roster-digest = "{digest}"\nroster-file = "{roster}"\n'
        f'signing-key-file = "{tmp_path / "c" / "roster-key"}"\n',
    )
    path = site / "site.toml"
    path.write_text(text + f'\n[release]\nversion = "0"\ndigest = "{"0" * 64}"\n')
    config = load_site_config(path)
    node_config = config.node_config()
    assert node_config[ROSTER_FILE_KEY] == str(roster)
    policy = ClientSecAggPolicy.for_site(node_config)
    assert _check_roster(config, policy) == []
    other = text.replace(digest, "ab" * 32)
    path.write_text(other + f'\n[release]\nversion = "0"\ndigest = "{"0" * 64}"\n')
    config = load_site_config(path)
    problems = _check_roster(config, ClientSecAggPolicy.for_site(config.node_config()))
    assert len(problems) == 1 and "not the roster you agreed to" in problems[0]
