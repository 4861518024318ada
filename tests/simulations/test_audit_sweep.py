"""``fedmm privacy-sweep --audit-only`` end to end on a tiny federation: canaries at the sites,
one real Flower simulation per epsilon, the one-run audit's bound in the sweep's outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.simulations.cli import build_parser, main
from fedmm.simulations.privacy.sweep_command import sweep_settings
from tests.simulations.marked_processes import new_marker, none_left

PROJECT_ROOT = Path(__file__).parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_DATA_DIR.exists(), reason="needs dataset-fashion-mnist")
def test_audit_points_end_to_end(tmp_path: Path) -> None:
    marker = new_marker()
    out = tmp_path / "sweep"
    options = (
        "--audit-only --audit-canaries 60 --audit-epsilons inf 3 --sites 3 --rounds 2 "
        "--records-per-site 150 --queries 1 --set eval-single-items=300 --set eval-scenes=50 "
        "--set batch-size=32 --set secure-aggregation=false"
    )
    command = [sys.executable, "-m", "fedmm.simulations.cli", "privacy-sweep", *options.split()]
    result = subprocess.run(
        [*command, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **marker},
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert none_left(marker)
    table = json.loads((out / "privacy-sweep.json").read_text())
    assert table["rows"] == []
    rows = {r["point"]: r for r in table["audit_rows"]}
    assert sorted(rows) == ["audit-iid-eps-3", "audit-iid-eps-inf"]
    private = rows["audit-iid-eps-3"]
    assert 2.5 < private["epsilon_site_max"] <= 3.0
    for row in rows.values():
        assert row["canaries"] == 60 and 0 < row["canaries_included"] < 60
        assert row["epsilon_lower_bound"] >= 0 and row["confidence"] == 0.95
    # the DP run's bound is at or below its accounted epsilon
    assert private["epsilon_lower_bound"] <= private["epsilon_site_max"]
    assert math.isinf(float(rows["audit-iid-eps-inf"]["epsilon_site_max"]))
    # every site trained on its records and its included canaries (the noisy count is
    # within a few sigma of it)
    point = json.loads((out / "points" / "audit-iid-eps-3.json").read_text())
    canaries = json.loads((out / "audit" / "audit-iid-eps-3" / "canaries.json").read_text())
    for site in range(3):
        included = sum(
            i and s == site for i, s in zip(canaries["included"], canaries["sites"], strict=True)
        )
        folder = out / "audit" / "audit-iid-eps-3" / "site-data" / f"site-{site}"
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 150 + included
    assert point["made_with"]["audit"]["canaries"] == 60
    assert "## One-run audit" in (out / "privacy-sweep.md").read_text()


def test_audit_options_reach_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["privacy-sweep", "--epsilons", "3", "--audit-canaries", "200", "--set-audit", "a=b"]
    )
    settings = sweep_settings(args)
    assert settings.audit is not None
    assert settings.audit.canaries == 200 and settings.audit.epsilons == (3.0,)
    assert settings.audit.run_config == {"a": "b"}
    assert [p.name for p in settings.points() if p.audit] == ["audit-iid-eps-3"]
    only = sweep_settings(build_parser().parse_args(["privacy-sweep", "--audit-only"]))
    assert [p.audit for p in only.points()] == [True] * 4 + [False] * 4
    assert all(p.gradient_audit for p in only.points()[4:])
    none = sweep_settings(build_parser().parse_args(["privacy-sweep", "--audit-canaries", "0"]))
    assert none.audit is None and not any(p.audit for p in none.points())
    assert (
        main(["privacy-sweep", "--audit-only", "--audit-canaries", "0", "--no-gradient-audit"]) == 2
    )
    assert "--audit-only" in capsys.readouterr().err
    assert main(["privacy-sweep", "--set-audit", "epsilon=1"]) == 2
    assert "set by the sweep itself" in capsys.readouterr().err


def test_gradient_audit_options_reach_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["privacy-sweep", "--audit-epsilons", "inf", "2", "--gradient-audit-canaries", "300"]
    )
    settings = sweep_settings(args)
    assert settings.gradient_audit is not None and settings.gradient_audit.canaries == 300
    whitebox = [p for p in settings.points() if p.gradient_audit]
    assert [p.name for p in whitebox] == ["whitebox-iid-eps-inf", "whitebox-iid-eps-2"]
    assert settings.points()[-2:] == whitebox  # after the black-box audit points
    off = sweep_settings(build_parser().parse_args(["privacy-sweep", "--no-gradient-audit"]))
    assert off.gradient_audit is None and not any(p.gradient_audit for p in off.points())
    # the white-box audit alone
    alone = sweep_settings(
        build_parser().parse_args(["privacy-sweep", "--audit-only", "--audit-canaries", "0"])
    )
    assert [p.name for p in alone.points()] == [
        "whitebox-iid-eps-inf", "whitebox-iid-eps-8", "whitebox-iid-eps-3", "whitebox-iid-eps-1",
    ]  # fmt: skip
    assert main(["privacy-sweep", "--gradient-audit-canaries", "1"]) == 2
    assert "--no-gradient-audit" in capsys.readouterr().err


@pytest.mark.skipif(not DEFAULT_DATA_DIR.exists(), reason="needs dataset-fashion-mnist")
def test_a_white_box_point_in_the_sweep_outputs(tmp_path: Path) -> None:
    """One white-box point through the sweep's runner (tiny recipe): its row in the JSON
    and markdown tables, its key file 0600, and a second run reuses the result."""
    from fedmm.simulations.privacy.sweep import run_sweep

    options = (
        "privacy-sweep --audit-only --audit-canaries 0 --audit-epsilons 3 "
        "--gradient-audit-canaries 200 --sites 2 --rounds 1 --records-per-site 64 "
        "--set batch-size=16 --set model-width=16 --set model-heads=2"
    )
    args = build_parser().parse_args(options.split())
    settings = sweep_settings(args)
    run_sweep(settings, tmp_path)
    table = json.loads((tmp_path / "privacy-sweep.json").read_text())
    assert table["rows"] == [] and table["audit_rows"] == []
    (row,) = table["gradient_audit_rows"]
    assert row["point"] == "whitebox-iid-eps-3"
    assert row["epsilon_accounted"] == pytest.approx(3.0, rel=2e-3)
    assert row["epsilon_lower_bound"] <= row["epsilon_accounted"]
    assert (row["sample_rate"], row["steps"], row["canaries"]) == (0.25, 4, 200)
    assert row["noise_multiplier"] > 0 and row["confidence"] == 0.95
    assert 0 < row["canaries_included"] < 200 and row["max_certifiable_epsilon"] > 0
    markdown = (tmp_path / "privacy-sweep.md").read_text()
    assert "## White-box one-run audit (gradient canaries)" in markdown
    assert "| whitebox-iid-eps-3 | 3 |" in markdown
    key = tmp_path / "audit" / "whitebox-iid-eps-3" / "canary-key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    point = json.loads((tmp_path / "points" / "whitebox-iid-eps-3.json").read_text())
    assert len(point["canary_scores"]["scores"]) == 200
    assert sum(point["canary_scores"]["included"]) == row["canaries_included"]
    assert run_sweep(settings, tmp_path)[0] == point  # reused, not run again
