"""``fedmm coordinator ...`` and ``fedmm site ...`` through the CLI's ``main`` (no daemon is
started: ``--dry-run`` prints the exact command)."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest

from fedmm.client.privacy_ledger import PrivacyLedger
from fedmm.server.certificate_authority import init_ca
from fedmm.simulations.cli import main
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
    command = ["coordinator", "start-superlink", str(ca), "--address", "127.0.0.1:9092"]
    assert main([*command, "--public-address", "10.0.0.5:9093", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    words = shlex.split(lines[0])
    assert words[0] == "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
    assert Path(words[1]).name == "flower-superlink"
    assert "--enable-supernode-auth" in words and "--insecure" not in words
    assert words[words.index("--host") + 1] == "127.0.0.1"
    proxy = shlex.split(lines[1])
    assert Path(proxy[0]).name == "nginx" and proxy[-2:] == ["-g", "daemon off;"]
    assert "only the Fleet API" in lines[2]
    assert not (ca / "proxy").exists()  # a dry run writes nothing
    bad = [*command, "--public-address", "10.0.0.6:9093"]
    assert main([*bad, "--dry-run"]) == 2
    assert "--san 10.0.0.6" in capsys.readouterr().err
    exposed = ["coordinator", "start-superlink", str(ca), "--address", "10.0.0.5:9093"]
    assert main([*exposed, "--dry-run"]) == 2
    assert "Control API" in capsys.readouterr().err


def test_site_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "keygen", str(tmp_path / "k")]) == 0
    assert "SHA256:" in capsys.readouterr().out
    assert main(["site", "keygen", str(tmp_path / "k")]) == 2
    config = make_site(tmp_path / "site")
    assert main(["site", "check", str(config)]) == 0
    assert "ok" in capsys.readouterr().out
    ca = init_ca(tmp_path / "coordinator").cert_file
    start = ["site", "start", str(config), "--superlink", "10.0.0.5:9093", "--port", "9201"]
    assert main([*start, "--ca-cert", str(ca), "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out.strip())
    assert words[0] == "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1"  # tasks start sooner
    assert Path(words[1]).name == "fedmm-supernode"  # the pinned Flower, prompt pull loop
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


# --- fedmm coordinator submit (checks and the exact command; no SuperLink needed) ----------


def _with_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``$FLWR_HOME`` in ``tmp_path`` with a connection ``coordinator`` to a closed port."""
    from fedmm.simulations.loopback_daemons import free_port

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    ca = tmp_path / "ca"
    assert main(["coordinator", "init-ca", str(ca)]) == 0
    address = f"127.0.0.1:{free_port()}"
    connection = ["coordinator", "--address", address, "--ca-cert", str(ca / "ca.crt")]
    assert main(["coordinator", "add-connection", *connection]) == 0
    capsys.readouterr()


SUBMIT = ["coordinator", "submit", "--connection", "coordinator"]


def test_submit_dry_run_names_the_out_dir_and_turns_dependency_installation_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_connection(tmp_path, monkeypatch, capsys)
    monkeypatch.chdir(tmp_path)
    settings = ["--set", "num-server-rounds=3", "--set", "model-width=16"]
    assert main([*SUBMIT, "--out-dir", "runs/a", *settings, "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out.strip())
    assert words[0] == "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
    assert Path(words[1]).name == "flwr" and words[2:3] == ["run"]
    assert words[4] == "coordinator" and "--stream" in words
    out = tmp_path / "runs" / "a"  # a relative --out-dir is made absolute for the ServerApp
    assert words[words.index("--run-config") + 1] == str(out / "submitted-run-config.toml")
    assert not out.exists()  # a dry run creates nothing


def test_submitted_run_config_reads_back_in_flwr_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr.common.config import parse_config_args

    from fedmm.common.federation_config import FederationConfig
    from fedmm.server.run_submission import (
        app_run_config_defaults,
        default_app_directory,
        prepare_submission,
        write_submitted_config,
    )

    _with_connection(tmp_path, monkeypatch, capsys)
    settings = {
        "num-server-rounds": "3",
        "epsilon": "inf",
        "learning-rate": "2",
        "data-dir": '/data/"fashion" mnist',
        "secure-aggregation": "false",
    }
    out = tmp_path / "out"
    submission = prepare_submission(connection="coordinator", out_dir=out, settings=settings)
    parsed = parse_config_args([str(write_submitted_config(submission))])
    expected = {
        "num-server-rounds": 3,
        "epsilon": float("inf"),
        "learning-rate": 2.0,
        "data-dir": '/data/"fashion" mnist',
        "secure-aggregation": False,
        "out-dir": str(out),
        "resume": False,
    }
    assert {key: parsed[key] for key in expected} == expected
    # The whole run config, every key of the app, so a resume does not depend on defaults.
    assert set(parsed) == set(app_run_config_defaults(default_app_directory()))
    assert parsed["model-width"] == FederationConfig().model_width
    assert FederationConfig.from_run_config(parsed).out_dir == str(out)


def test_submit_refuses_bad_input_naming_it_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_connection(tmp_path, monkeypatch, capsys)
    (tmp_path / "a-file").write_text("")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")
    pretrained = [
        *(
            "--set",
            "model-image-encoder=open_clip:tiny",
            "--set",
            "model-text-encoder=open_clip:tiny",
        ),
        *("--set", "image-size=32x32", "--set", "image-channels=3"),
        *("--set", f"model-image-weights-sha256={'0' * 64}", "--set"),
    ]
    cases = [
        (["--connection", "nowhere"], "connection 'nowhere' is not in", "add-connection nowhere"),
        (["--out-dir", str(tmp_path / "a-file" / "run")], "is not writable", "permissions"),
        (["--set", "epochs=3"], "--set epochs: not a run config key", "known keys"),
        (["--set", "num-server-rounds=many"], "'num-server-rounds' = 'many'", "int"),
        (["--set", "out-dir=/tmp/x"], "--set out-dir", "use --out-dir DIR"),
        (["--out-dir", str(busy)], "is not empty", "--resume"),
        (["--resume"], "holds no submitted run", "without --resume"),
        # The coordinator's copy of frozen weights: missing, then not the pinned file.
        (
            [*pretrained, f"model-image-weights={tmp_path / 'none'}"],
            "do not exist",
            "copy them there",
        ),
        (
            [*pretrained, f"model-image-weights={tmp_path / 'a-file'}"],
            "the run pins " + "0" * 64,
            "put the pinned",
        ),
    ]
    for extra, problem, fix in cases:
        argv = [*SUBMIT, "--out-dir", str(tmp_path / "fresh"), "--dry-run"]
        if extra[0] in ("--connection", "--out-dir"):  # replace the default
            at = argv.index(extra[0])
            argv[at : at + 2] = extra
            extra = []
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert problem in err and fix in err, err


def test_submit_without_a_superlink_says_so_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_connection(tmp_path, monkeypatch, capsys)  # its port is closed
    assert main([*SUBMIT, "--out-dir", str(tmp_path / "run")]) == 2
    assert "Is the SuperLink running" in capsys.readouterr().err
    assert list((tmp_path / "run").iterdir()) == []  # submitting again is fine


def test_resume_continues_the_submitted_run_after_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from fedmm.server.checkpoints import save_checkpoint
    from fedmm.server.run_submission import (
        prepare_submission,
        record_submission,
        run_id_in,
        submitted_run_ids,
        write_submitted_config,
    )

    _with_connection(tmp_path, monkeypatch, capsys)
    out = tmp_path / "run"
    first = prepare_submission(
        connection="coordinator", out_dir=out, settings={"num-server-rounds": "2", "seed": "7"}
    )
    write_submitted_config(first)
    run_id = run_id_in("\x1b[32mSuccessfully started run 18446744073709551557\x1b[0m")
    assert run_id == 18446744073709551557  # uint64 run ids
    record_submission(out, run_id=run_id, connection="coordinator", resume=False)
    assert submitted_run_ids(out) == [run_id]

    resume = [*SUBMIT, "--out-dir", str(out), "--resume", "--dry-run"]
    assert main(resume) == 0
    assert "starts again at round 1" in capsys.readouterr().out  # no checkpoint yet
    save_checkpoint(out, 1, {"w": np.zeros(3, dtype=np.float32)})
    assert main(resume) == 0
    assert "after round 1" in capsys.readouterr().out
    again = prepare_submission(connection="coordinator", out_dir=out, settings={}, resume=True)
    assert again.run_config["seed"] == 7 and again.run_config["resume"] is True
    assert again.run_config["num-server-rounds"] == 2 and again.resume_after == 1

    assert main([*resume, "--set", "model-width=64"]) == 2  # another model: a new run
    assert "model-width differs from the submitted run" in capsys.readouterr().err
    assert main([*resume, "--set", "num-server-rounds=4"]) == 0
    assert main([*resume, "--set", "model-width=32"]) == 0  # the value the run has (default)

    save_checkpoint(out, 2, {"w": np.zeros(3, dtype=np.float32)})
    (out / "model.safetensors").write_bytes(b"")
    (out / "summary.json").write_text("{}")
    assert main(resume) == 2
    assert "already finished all 2 rounds" in capsys.readouterr().err
    assert main([*resume, "--set", "num-server-rounds=3"]) == 0  # train longer


def test_release_digest_prints_the_pin_for_the_site_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedmm.client.release_pin import installed_release

    release = installed_release()
    assert main(["site", "release-digest"]) == 0
    out = capsys.readouterr().out
    assert f'[release]\nversion = "{release.version}"\ndigest = "{release.digest}"' in out
    assert main(["site", "release-digest", "--files"]) == 0
    files = capsys.readouterr().out.split()
    assert "client/site_runner.py" in files and "pyproject.toml" in files
    assert not any(name.endswith(".pyc") for name in files)
