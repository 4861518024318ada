"""A real 3-site, 2-round run through Flower's simulation runtime, then a resume.

Three sites, the fewest whose sum secure aggregation (on by default) releases: a sum over two
would reveal each site's update to the other.

Runs ``fedmm simulate`` as a subprocess (Ray backend, real ClientApps with Opacus) on a small
slice of the benchmark. The resumed run asks for a third round that the sites' ledgers,
calibrated for two rounds, cannot afford: every site refuses, the round leaves the model
unchanged, and the run still finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from tests.simulations.marked_processes import new_marker, none_left

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

SMALL = [
    "--set",
    "site-records-limit=200",
    "--set",
    "eval-single-items=500",
    "--set",
    "eval-scenes=100",
    "--set",
    "batch-size=32",
    "--set",
    "eval-every=1",
]


def _simulate(
    out: Path, *args: str, marker: dict[str, str] | None = None, quiet: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(marker or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmm.simulations.cli",
            "simulate",
            "--sites",
            "3",
            "--out",
            str(out),
            *args,
            *SMALL,
            *(["--quiet"] if quiet else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).parents[2],
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_sites_two_rounds_then_resume_with_budget_refusal(tmp_path: Path) -> None:
    marker = new_marker()
    out = tmp_path / "run"
    first = _simulate(out, "--rounds", "2", "--epsilon", "3", marker=marker, quiet=False)
    assert first.returncode == 0, first.stderr[-3000:]
    # The terminal shows the progress bar, one line per round and the summary; Flower's,
    # Ray's and the sites' own output is in the run log.
    assert first.stderr == ""
    assert "round 1/2, accuracy" in first.stdout and "round 2/2, accuracy" in first.stdout
    for noise in ("DEBUG", "WARNING", "INFO", "Warning"):
        assert noise not in first.stdout, noise
    assert "DEBUG flwr" in (out / "run.log").read_text()
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sites_trained"] == 3 and r["sites_refused"] == 0 for r in rows), rows
    assert [float(r["epsilon_bound_max"]) for r in rows] == [3.0, 3.0]  # the bound, not spend
    assert all("train_loss" not in r and float(r["eval_loss"]) > 0 for r in rows)
    # The runner owns the simulated sites' ledgers: their exact spend is in the summary.
    sites = json.loads((out / "summary.json").read_text())["site_epsilons"]
    assert sorted(sites) == ["site-0", "site-1", "site-2"]
    assert all(0 < float(s["epsilon"]) <= 3.0 and s["delta"] == 1e-5 for s in sites.values())
    assert "Each site's exact epsilon" in (out / "report.md").read_text()
    for key in ("accuracy", "r_at_1_i2t", "r_at_1_t2i", "r_at_5_i2t", "r_at_5_t2i", "wall_s"):
        assert 0 <= float(rows[-1][key]) <= (1 if key != "wall_s" else 600)
    for name in (
        "model.safetensors",
        "summary.json",
        "report.md",
        "accuracy.png",
        "epsilon.png",
        "checkpoints/latest.json",
    ):
        assert (out / name).exists(), name
    ledgers = sorted((out / "site-ledgers").glob("site-*.json"))
    assert len(ledgers) == 3
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in ledgers)
    weights_after_2 = (out / "checkpoints" / "round-0002.safetensors").read_bytes()

    resumed = _simulate(out, "--resume", "--rounds", "3", marker=marker)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    third = rows[-1]
    assert third["sites_refused"] == 3 and third["sites_trained"] == 0
    assert "no site trained" in third["aborted"]
    weights_after_3 = (out / "checkpoints" / "round-0003.safetensors").read_bytes()
    assert weights_after_3 == weights_after_2  # the model is unchanged by a refused round
    # The sites say why in their own log (here the run log); the coordinator gets a code.
    assert "privacy budget" in (out / "run.log").read_text()
    assert "privacy budget" not in (out / "metrics.jsonl").read_text()
    assert none_left(marker), "the simulation left processes (Ray's included) behind"


def test_out_folder_with_a_run_needs_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    result = _simulate(out, "--rounds", "1")
    assert result.returncode == 2
    assert "--resume" in result.stderr
