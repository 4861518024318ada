"""The site config: every problem named with its key and fix; the node config it gives is
what ``client/app.py`` reads, and survives ``flower-supernode --node-config`` parsing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedmm.client.privacy_ledger import PrivacyLedger
from fedmm.client.site_config import (
    SiteConfigError,
    check_site_config,
    load_site_config,
    node_config_argument,
    prepare_site_folders,
)
from fedmm.client.supernode_launch import SiteLaunchError, ledger_status, supernode_argv
from fedmm.server.certificate_authority import init_ca
from tests.client.site_fixtures import GOOD, make_site


def test_good_config_gives_absolute_node_config_for_the_client_app(tmp_path: Path) -> None:
    config = check_site_config(make_site(tmp_path / "site"))
    root = (tmp_path / "site").resolve()
    assert config.warnings == ()
    assert config.node_config() == {
        "imagefolder": str(root / "data"),
        "ledger-file": str(root / "state" / "privacy-ledger.json"),
        "withdrawals-file": str(root / "state" / "withdrawals.jsonl"),
        "audit-log": str(root / "state" / "site-audit.jsonl"),
        "deid-policy": str(root / "deid-policy.toml"),
        "site-secret": str(root / "secrets" / "site-secret"),
        "deid-cache-dir": str(root / "cache"),
        "policy-file": str(root / "privacy-policy.toml"),
        "secagg-min-threshold": 3,
        "secagg-min-sites": 3,
        "secagg-spill-dir": str(root / "spill"),
    }
    policy = config.privacy_policy()
    assert (policy.max_epsilon, policy.delta) == (2.0, 1e-6)


def test_node_config_survives_flower_supernode_parsing(tmp_path: Path) -> None:
    site = tmp_path / "a site with spaces"
    text = GOOD.replace('policy-file = "privacy-policy.toml"', "max-epsilon = inf\ndelta = 1e-6")
    config = check_site_config(make_site(site, text))
    argument = node_config_argument(config.node_config())
    assert parse_config_args([argument]) == config.node_config()
    assert config.node_config()["privacy-max-epsilon"] == float("inf")
    assert any("without DP" in w for w in config.warnings)


def test_every_structural_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        """
[data]
image-folder = "x"

[privacy]
policy-file = "p.toml"
max-epsilon = "three"
delta = 1e-6

[secure-aggregation]
min-sites = true

[extras]
x = 1
"""
    )
    with pytest.raises(SiteConfigError) as caught:
        load_site_config(path)
    text = "\n".join(caught.value.problems)
    assert "[data] image-folder: unknown key; known: imagefolder" in text
    assert "[data] imagefolder is required" in text
    assert "[privacy] max-epsilon: expected a number, got 'three'" in text
    assert "[privacy] ledger-file is required" in text
    assert "[supernode] auth-private-key is required" in text
    assert "fedmm site keygen" in text
    assert "[secure-aggregation] min-sites: expected an integer, got True" in text
    assert "unknown section [extras]" in text
    assert "[privacy] policy-file and inline keys (delta) both given" in text


def test_files_are_checked_with_the_fix_named(tmp_path: Path) -> None:
    path = make_site(tmp_path / "site")
    root = tmp_path / "site"
    os.chmod(root / "keys" / "site-auth-key", 0o644)
    (root / "data" / "metadata.jsonl").unlink()
    (root / "deid-policy.toml").write_text("face_mode = 'smudge'\n")
    (root / "privacy-policy.toml").write_text("[privacy]\nmax-epsilon = -1\n")
    (root / "secrets").mkdir()
    (root / "secrets" / "site-secret").write_bytes(b"x" * 32)
    os.chmod(root / "secrets" / "site-secret", 0o644)
    with pytest.raises(SiteConfigError) as caught:
        check_site_config(path)
    text = "\n".join(caught.value.problems)
    assert "[data] imagefolder" in text and "no metadata.jsonl" in text
    assert f"chmod 600 {(root / 'keys' / 'site-auth-key').resolve()}" in text
    assert f"chmod 600 {(root / 'secrets' / 'site-secret').resolve()}" in text
    assert "[deidentification] policy" in text and "face_mode" in text
    assert "[privacy]" in text and "max-epsilon must be > 0" in text


def test_cache_inside_the_data_and_missing_key_are_refused(tmp_path: Path) -> None:
    path = make_site(tmp_path / "site", GOOD.replace('cache-dir = "cache"', 'cache-dir = "data/c"'))
    (tmp_path / "site" / "keys" / "site-auth-key").unlink()
    with pytest.raises(SiteConfigError) as caught:
        check_site_config(path)
    text = "\n".join(caught.value.problems)
    assert "cache-dir" in text and "inside the imagefolder" in text
    assert "auth-private-key" in text and "fedmm site keygen" in text


def test_without_a_policy_the_default_one_applies_with_a_warning(tmp_path: Path) -> None:
    text = GOOD.replace('policy = "deid-policy.toml"\n', "").replace(
        'site-secret = "secrets/site-secret"\n', ""
    )
    config = check_site_config(make_site(tmp_path / "site", text))
    assert "deid-policy" not in config.node_config()
    assert "site-secret" not in config.node_config()
    assert any("default de-identification policy" in w for w in config.warnings)
    assert any("no site-secret" in w for w in config.warnings)
    path = tmp_path / "off.toml"
    path.write_text(GOOD.replace('policy = "deid-policy.toml"', "enabled = false"))
    with pytest.raises(SiteConfigError, match=r"\[deidentification\] enabled: unknown key"):
        load_site_config(path)


def test_supernode_command_carries_tls_auth_port_and_node_config(tmp_path: Path) -> None:
    config = check_site_config(make_site(tmp_path / "site"))
    ca = init_ca(tmp_path / "coordinator").cert_file
    argv = supernode_argv(config, superlink="10.0.0.5:9093", ca_cert=ca, port=9201)
    assert Path(argv[0]).name == "fedmm-supernode"
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert flags["--superlink"] == "10.0.0.5:9093"
    assert flags["--root-certificates"] == str(ca.resolve())
    assert flags["--auth-supernode-private-key"] == str(config.auth_private_key)
    assert flags["--port"] == "9201"
    assert (flags["--isolation"], flags["--host"]) == ("process", "127.0.0.1")  # runs no app
    # What the audit log records of the coordinator: its address and the SHA-256 fingerprint
    # of the certificate the site verifies it with, as openssl prints it.
    openssl = subprocess.run(
        ["openssl", "x509", "-in", str(ca), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert parse_config_args([flags["--node-config"]]) == {
        **config.node_config(),
        "coordinator-address": "10.0.0.5:9093",
        "coordinator-certificate-sha256": openssl.split("=", 1)[1],
    }
    assert "--insecure" not in argv
    fake = tmp_path / "fake.crt"
    fake.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(SiteLaunchError, match="no PEM certificate"):
        supernode_argv(config, superlink="10.0.0.5:9093", ca_cert=fake, port=9201)


def test_status_reads_the_ledger_file(tmp_path: Path) -> None:
    config = check_site_config(make_site(tmp_path / "site"))
    fresh = ledger_status(config)
    assert (fresh.exists, fresh.epsilon, fresh.rounds, fresh.max_epsilon) == (False, 0.0, [], 2.0)
    ledger = PrivacyLedger(
        noise_multiplier=1.2,
        delta=1e-6,
        history=[(20.0, 1.0, 1), (1.2, 0.05, 20), (1.2, 0.05, 20)],  # noisy count, then DP-SGD
        rounds=[1, 2],
    )
    ledger.save(config.ledger_file)
    status = ledger_status(config)
    assert status.exists and status.accountant == "rdp"
    assert status.epsilon == pytest.approx(ledger.epsilon(1e-6))
    assert (status.rounds, status.steps, status.entries, status.delta) == ([1, 2], 40, 3, 1e-6)
    assert status.count_releases == 1  # the noisy count is not a DP-SGD step
    assert status.remaining == pytest.approx(max(0.0, 2.0 - status.epsilon))


def test_the_release_pin_is_required_and_must_be_the_installed_release(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    make_site(tmp_path / "site")
    text = (tmp_path / "site" / "site.toml").read_text()
    path.write_text(text[: text.index("[release]")])
    with pytest.raises(SiteConfigError) as caught:
        load_site_config(path)
    problems = "\n".join(caught.value.problems)
    assert "[release] version is required" in problems
    assert "[release] digest is required" in problems and "release-digest" in problems
    other = "sha256:" + "0" * 64
    mismatched = make_site(
        tmp_path / "other", GOOD + f'\n[release]\nversion = "0.1.0"\ndigest = "{other}"\n'
    )
    with pytest.raises(SiteConfigError, match=f"the pin is {other} but the installed release"):
        check_site_config(mismatched)
    bad = make_site(tmp_path / "bad", GOOD + '\n[release]\nversion = "0.1.0"\ndigest = "abc"\n')
    with pytest.raises(SiteConfigError, match=r"\[release\] digest: 'abc' is not a SHA-256"):
        load_site_config(bad)


def test_site_folders_are_checked_and_made_private(tmp_path: Path) -> None:
    path = make_site(tmp_path / "site")
    config = check_site_config(path)
    spill = tmp_path / "site" / "spill"
    assert not spill.exists()  # checking makes nothing
    made = prepare_site_folders(config)
    assert spill.resolve() in made and oct(spill.stat().st_mode & 0o777) == "0o700"
    assert oct(config.ledger_file.parent.stat().st_mode & 0o777) == "0o700"
    assert prepare_site_folders(config) == []
    os.chmod(spill, 0o755)
    (tmp_path / "site" / "cache").mkdir(mode=0o777)
    os.chmod(tmp_path / "site" / "cache", 0o777)
    with pytest.raises(SiteConfigError) as caught:
        check_site_config(path)
    problems = "\n".join(caught.value.problems)
    assert f"[secure-aggregation] spill-dir: {spill.resolve()} is open to other users" in problems
    assert f"chmod 700 {spill.resolve()}" in problems
    assert "[deidentification] cache-dir" in problems
    os.chmod(spill, 0o700)
    spill.rmdir()
    spill.write_text("")
    with pytest.raises(SiteConfigError, match=r"spill-dir: .* is not a folder"):
        check_site_config(path)


def test_status_imports_no_torch(tmp_path: Path) -> None:
    """``fedmm site status`` answers in well under a second: no torch (or opacus) import."""
    import subprocess
    import sys

    config = make_site(tmp_path / "site")
    ledger = PrivacyLedger(noise_multiplier=1.1, delta=1e-6, history=[(1.1, 0.1, 10)], rounds=[4])
    ledger.save(tmp_path / "site" / "state" / "privacy-ledger.json")
    code = (
        "import sys\n"
        "from fedmm.simulations.cli import main\n"
        f"assert main(['site', 'status', {str(config)!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"epsilon spent     {ledger.epsilon():.4f}" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_site_check_reads_the_secure_aggregation_policy_as_every_round_will(
    tmp_path: Path,
) -> None:
    """A minimum aggregation size below 3 would make the site refuse every round: the check
    says so up front, naming the key (the policy's own parser, not a second copy of it)."""
    config = make_site(tmp_path / "site", GOOD.replace("min-sites = 3", "min-sites = 2"))
    with pytest.raises(SiteConfigError) as caught:
        check_site_config(config)
    text = "\n".join(caught.value.problems)
    assert "[secure-aggregation]" in text and "min-sites" in text and "3" in text
    good = make_site(tmp_path / "other", GOOD + "colluding-fraction = 0.2\nmax-degree = 20\n")
    node_config = check_site_config(good).node_config()
    assert node_config["secagg-colluding-fraction"] == 0.2
    assert node_config["secagg-max-degree"] == 20


def test_data_rights_files_are_private_and_the_retention_is_positive(tmp_path: Path) -> None:
    text = GOOD.replace('cache-dir = "cache"', 'cache-dir = "cache"\ncache-retention-days = 0')
    text = text.replace(
        'ledger-file = "state/privacy-ledger.json"',
        'ledger-file = "state/privacy-ledger.json"\naudit-log = "logs/audit.jsonl"',
    )
    config_path = make_site(tmp_path / "site", text)
    audit = tmp_path / "site" / "logs" / "audit.jsonl"
    audit.parent.mkdir()
    audit.write_text("")
    audit.chmod(0o644)
    with pytest.raises(SiteConfigError) as caught:
        check_site_config(config_path)
    problems = "\n".join(caught.value.problems)
    assert "cache-retention-days: 0 must be a number of days > 0" in problems
    assert f"[privacy] audit-log: the audit log {audit} is readable" in problems
    config = load_site_config(config_path)
    assert config.node_config()["audit-log"] == str(audit)
    assert config.node_config()["deid-cache-retention-days"] == 0.0


def test_the_pretrained_weights_folder_reaches_the_node_config(tmp_path: Path) -> None:
    """``[pretrained] weights-dir``: where the site keeps its copies of frozen weights
    (``client.pretrained_site``), absolute, under the node config key the site reads."""
    from fedmm.client.pretrained_site import PRETRAINED_WEIGHTS_DIR

    text = GOOD + '\n[pretrained]\nweights-dir = "weights"\n'
    config = check_site_config(make_site(tmp_path / "site", text))
    expected = str((tmp_path / "site" / "weights").resolve())
    assert config.node_config()[PRETRAINED_WEIGHTS_DIR] == expected
    with pytest.raises(SiteConfigError, match=r"weights-dir"):
        load_site_config(make_site(tmp_path / "bad", GOOD + "\n[pretrained]\nweights-dir = 3\n"))
