"""``fedmm coordinator ...`` and ``fedmm site ...`` through the CLI's ``main`` (no daemon is
started: ``--dry-run`` prints the exact command)."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest

from client.privacy_ledger import PrivacyLedger
from simulations.cli import main
from tests.client.site_fixtures import make_site


def test_coordinator_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert main(["coordinator", "init-ca", str(ca)]) == 0
    assert main(["coordinator", "issue-cert", str(ca), "--san", "10.0.0.5"]) == 0
    assert stat.S_IMODE((ca / "superlink.key").stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert "10.0.0.5, 127.0.0.1, localhost" in out
    assert main(["coordinator", "init-ca", str(ca)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    command = ["coordinator", "start-superlink", str(ca), "--address", "10.0.0.5:9093"]
    assert main([*command, "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    words = shlex.split(line)
    assert words[0] == "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
    assert Path(words[1]).name == "flower-superlink"
    assert "--enable-supernode-auth" in words and "--insecure" not in words
    bad = ["coordinator", "start-superlink", str(ca), "--address", "10.0.0.6:9093"]
    assert main([*bad, "--dry-run"]) == 2
    assert "--san 10.0.0.6" in capsys.readouterr().err


def test_site_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "keygen", str(tmp_path / "k")]) == 0
    assert "SHA256:" in capsys.readouterr().out
    assert main(["site", "keygen", str(tmp_path / "k")]) == 2
    config = make_site(tmp_path / "site")
    assert main(["site", "check", str(config)]) == 0
    assert "ok" in capsys.readouterr().out
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    start = ["site", "start", str(config), "--superlink", "10.0.0.5:9093", "--port", "9201"]
    assert main([*start, "--ca-cert", str(ca), "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out.strip())
    assert Path(words[0]).name == "flower-supernode"
    assert words[words.index("--root-certificates") + 1] == str(ca.resolve())
    assert main([*start, "--ca-cert", str(tmp_path / "missing.crt"), "--dry-run"]) == 2
    assert "ca.key" in capsys.readouterr().err  # says: the certificate only, never the key

    (tmp_path / "site" / "data" / "metadata.jsonl").unlink()
    assert main(["site", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "has problems" in err and "[data] imagefolder" in err
    assert main([*start, "--ca-cert", str(ca), "--dry-run"]) == 2  # start checks first


def test_site_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_site(tmp_path / "site")
    assert main(["site", "status", str(config)]) == 0
    assert "(none yet)" in capsys.readouterr().out
    ledger = PrivacyLedger(noise_multiplier=1.1, delta=1e-6, history=[(1.1, 0.1, 10)], rounds=[4])
    ledger.save(tmp_path / "site" / "state" / "privacy-ledger.json")
    assert main(["site", "status", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"epsilon spent     {ledger.epsilon():.4f} of 2" in out
    assert "rounds trained    1 [4]" in out and "accountant        rdp" in out
