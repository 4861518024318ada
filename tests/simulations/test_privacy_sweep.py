"""``fedmm privacy-sweep`` end to end on a small configuration (real Flower simulations with
Opacus at the sites, real shadow federations in worker processes), and its input checks.

Two points: Dirichlet at epsilon 3 and the non-private overfit point. Nothing it starts may
outlive it: every process carrying the test's environment marker is looked for afterwards.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.simulations.cli import build_parser, main
from tests.simulations.marked_processes import new_marker, none_left

PROJECT_ROOT = Path(__file__).parents[2]

SMALL_SWEEP = [
    "--epsilons", "3",
    "--partitions", "dirichlet",
    "--sites", "2",
    "--rounds", "2",
    "--records-per-site", "150",
    "--shadows", "2",
    "--queries", "1",
    "--overfit-records-per-site", "100",
    "--overfit-local-epochs", "20",
    "--overfit-rounds", "2",
    "--set", "eval-single-items=300",
    "--set", "eval-scenes=50",
    "--set", "batch-size=32",
    # Two sites cannot run secure aggregation (each would learn the other's update), and the
    # attacks measure what the released model memorises, which it does not change.
    "--set", "secure-aggregation=false",
    # the audit points have their own tests (test_audit_sweep.py, test_gradient_canary_audit.py)
    "--audit-canaries", "0", "--no-gradient-audit",
]  # fmt: skip


@pytest.mark.skipif(not DEFAULT_DATA_DIR.exists(), reason="needs dataset-fashion-mnist")
def test_small_sweep_end_to_end(tmp_path: Path) -> None:
    marker = new_marker()
    out = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmm.simulations.cli",
            "privacy-sweep",
            *SMALL_SWEEP,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **marker},
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert none_left(marker), "the sweep left processes behind (Ray, shadow workers)"

    table = json.loads((out / "privacy-sweep.json").read_text())
    rows = {row["point"]: row for row in table["rows"]}
    assert sorted(rows) == ["dirichlet-eps-3", "overfit-iid-eps-inf"]
    private, overfit = rows["dirichlet-eps-3"], rows["overfit-iid-eps-inf"]
    for row in (private, overfit):
        assert row["rounds"] == 2
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["r_at_1_i2t"] <= 1
        assert 0 <= row["loss_auc"] <= 1 and 0 <= row["lira_auc"] <= 1
        assert 0 <= row["lira_tpr_at_0_1_fpr"] <= row["lira_tpr_at_1_fpr"] <= 1
        assert row["num_members"] == row["num_non_members"] > 0
        assert row["train_wall_s"] > 0
    # Epsilon: calibrated for the whole run at each site, cross-checked with dp-accounting.
    assert 2.5 < private["epsilon_site_min"] <= private["epsilon_site_max"] <= 3.0
    assert private["epsilon_dp_accounting_rdp_max"] == pytest.approx(
        private["epsilon_site_max"], rel=0.01
    )
    assert private["epsilon_dp_accounting_pld_max"] < private["epsilon_dp_accounting_rdp_max"]
    assert private["delta"] == 1e-5 and private["noise_multiplier_max"] > 0
    assert math.isinf(float(overfit["epsilon_site_max"]))
    point = json.loads((out / "points" / "dirichlet-eps-3.json").read_text())
    assert len(point["site_epsilons"]) == 2
    assert (
        point["membership"]["shadow_pool"] > 0 and len(point["membership"]["shadow_accuracy"]) == 2
    )
    assert point["run_config"]["site-records-limit"] == "150"
    # The overfit point memorised its members: lower loss on them than on non-members.
    overfit_point = json.loads((out / "points" / "overfit-iid-eps-inf.json").read_text())
    assert overfit_point["membership"]["attacks"][0]["attack"] == "loss threshold"
    assert overfit["loss_auc"] > 0.5
    _members_are_what_site_0_trained_on(out / "runs" / "dirichlet-eps-3", sites=2)
    markdown = (out / "privacy-sweep.md").read_text()
    assert "| dirichlet-eps-3 | dirichlet | 3 |" in markdown
    assert "inf (no DP)" in markdown
    for png in ("accuracy-vs-epsilon.png", "roc-curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _members_are_what_site_0_trained_on(run: Path, *, sites: int) -> None:
    """The attacked members are exactly records site 0 trained on, as it trained on them
    (after its de-identification); no non-member is among them."""
    from fedmm.common.data.benchmark import benchmark_train_records
    from fedmm.simulations.privacy.membership_experiment import _site_view, read_run_config
    from fedmm.simulations.privacy.membership_split import membership_split

    config = read_run_config(run)
    records = benchmark_train_records(None)
    split = membership_split(
        records.labels,
        num_sites=sites,
        scheme=config.partition,  # type: ignore[arg-type]
        alpha=config.dirichlet_alpha,
        partition_seed=config.seed,
        records_per_site=config.site_records_limit,
    )
    targets = _site_view(run, 0, run / "check-deid")(records.subset(split.targets), "targets")
    from fedmm.client.deid.cache import CACHE_PURPOSE, EncryptedEntry
    from fedmm.client.encrypted_cache import derive_cache_key
    from fedmm.client.feature_cache import FEATURES_DIR

    site = run / "site-deid" / "site-0"
    # site 0's training data (encrypted), beside its scattering features' folder
    (path,) = [p for p in (site / "cache").iterdir() if p.name != FEATURES_DIR]
    entry = EncryptedEntry(
        path, derive_cache_key((site / "site-secret").read_bytes(), CACHE_PURPOSE)
    )
    captions = json.loads(entry["captions.json"])
    with np.load(io.BytesIO(entry["records.npz"])) as arrays:
        trained = {(i.tobytes(), c) for i, c in zip(arrays["images"], captions, strict=True)}
    inside = [
        (targets.images[i].tobytes(), targets.captions[i]) in trained for i in range(len(targets))
    ]
    n = len(split.members)
    assert all(inside[:n]) and not any(inside[n:])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--shadows", "1"], "at least 2"),
        (["--set", "novalue"], "KEY=VALUE"),
        (["--set", "site-records-limit=5"], "set by the sweep itself"),
        (["--sites", "2", "--target-site", "2"], "--target-site"),
        (["--set-overfit", "batch-size=8"], "set by the overfit options"),
        (["--set-overfit", "novalue"], "--set-overfit expects KEY=VALUE"),
        (["--set-overfit", "epsilon=1"], "set by the overfit options"),
    ],
)
def test_bad_options_exit_2_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    assert main(["privacy-sweep", "--out", str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_epsilon_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["privacy-sweep", "--epsilons", "0"])
    assert exit_info.value.code == 2
    assert "epsilon must be > 0" in capsys.readouterr().err


def test_sweep_points_cover_every_partition_and_epsilon_then_the_overfit_point() -> None:
    from fedmm.simulations.privacy.sweep import OverfitSettings, SweepSettings

    settings = SweepSettings(run_config={"batch-size": "64"})
    points = settings.points()
    assert [p.name for p in points] == [
        "iid-eps-inf", "iid-eps-8", "iid-eps-3", "iid-eps-1",
        "dirichlet-eps-inf", "dirichlet-eps-8", "dirichlet-eps-3", "dirichlet-eps-1",
        "overfit-iid-eps-inf",
        "audit-iid-eps-inf", "audit-iid-eps-8", "audit-iid-eps-3", "audit-iid-eps-1",
        "whitebox-iid-eps-inf", "whitebox-iid-eps-8", "whitebox-iid-eps-3", "whitebox-iid-eps-1",
    ]  # fmt: skip
    by_name = {p.name: p for p in points}
    assert by_name["iid-eps-inf"].run_config == {"batch-size": "64", "learning-rate": "0.5"}
    assert by_name["dirichlet-eps-3"].run_config == {"batch-size": "64"}  # the DP recipe
    overfit = by_name["overfit-iid-eps-inf"]
    assert overfit.sites == OverfitSettings().sites and overfit.overfit
    assert overfit.run_config["batch-size"] == "32" and overfit.run_config["local-epochs"] == "20"
    assert overfit.run_config["secure-aggregation"] == "false"  # two sites: plain FedAvg
    assert all(p.sites == 10 for p in points if not p.overfit)
    audit = by_name["audit-iid-eps-3"]
    assert audit.audit and audit.run_config == by_name["iid-eps-3"].run_config
    assert by_name["audit-iid-eps-inf"].run_config == by_name["iid-eps-inf"].run_config
    # the white-box points take the audit points' recipe
    for epsilon in ("inf", "3"):
        whitebox, audit = (
            by_name[f"whitebox-iid-eps-{epsilon}"],
            by_name[f"audit-iid-eps-{epsilon}"],
        )
        assert whitebox.gradient_audit and not whitebox.audit
        assert whitebox.run_config == audit.run_config and whitebox.epsilon == audit.epsilon
        assert (whitebox.sites, whitebox.rounds, whitebox.records_per_site) == (
            audit.sites,
            audit.rounds,
            audit.records_per_site,
        )
    with pytest.raises(ValueError, match="set by the sweep itself"):
        SweepSettings(non_private_run_config={"epsilon": "1"})
    with pytest.raises(ValueError, match="epsilons"):
        SweepSettings(epsilons=(0.0,))
    with pytest.raises(ValueError, match="partitions"):
        SweepSettings(partitions=("pathological",))


def test_overfit_recipe_at_several_epsilons_differs_only_in_epsilon() -> None:
    from fedmm.simulations.privacy.sweep import OverfitSettings, SweepSettings

    settings = SweepSettings(
        epsilons=(3.0,),
        partitions=("iid",),
        overfit=OverfitSettings(epsilons=(math.inf, 8.0)),
        audit=None,
        gradient_audit=None,
    )
    points = {p.name: p for p in settings.points()}
    assert list(points) == ["iid-eps-3", "overfit-iid-eps-inf", "overfit-iid-eps-8"]
    plain, private = points["overfit-iid-eps-inf"], points["overfit-iid-eps-8"]
    assert math.isinf(plain.epsilon) and private.epsilon == 8.0
    assert private.overfit and private.run_config == plain.run_config
    assert (private.sites, private.rounds, private.records_per_site) == (
        plain.sites,
        plain.rounds,
        plain.records_per_site,
    )
    with pytest.raises(ValueError, match="overfit epsilons"):
        OverfitSettings(epsilons=(-1.0,))
    with pytest.raises(ValueError, match="overfit epsilons"):
        OverfitSettings(epsilons=())


def test_overfit_options_reach_the_sweep_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmm.simulations.privacy.sweep import OverfitSettings
    from fedmm.simulations.privacy.sweep_command import sweep_settings

    default = sweep_settings(build_parser().parse_args(["privacy-sweep"])).overfit
    assert default == OverfitSettings()  # the command's defaults are the settings' defaults
    assert default.epsilons == (math.inf,) and default.optimizer == "adam"
    options = "--overfit-epsilons inf 3 --overfit-batch-size 128 --overfit-learning-rate 2"
    options += " --overfit-records-per-site 1000 --set-overfit model-image-encoder=scatter"
    options += " --overfit-optimizer sgd"
    args = build_parser().parse_args(["privacy-sweep", *options.split()])
    overfit = sweep_settings(args).overfit
    assert overfit is not None and overfit.epsilons == (math.inf, 3.0)
    assert (overfit.batch_size, overfit.learning_rate, overfit.records_per_site) == (128, 2, 1000)
    points = {p.name: p for p in sweep_settings(args).points() if p.overfit}
    assert points["overfit-iid-eps-3"].run_config["batch-size"] == "128"
    assert points["overfit-iid-eps-3"].run_config["learning-rate"] == "2.0"
    assert points["overfit-iid-eps-3"].run_config["optimizer"] == "sgd"
    assert points["overfit-iid-eps-inf"].run_config["model-image-encoder"] == "scatter"
    main_points = [p for p in sweep_settings(args).points() if not p.overfit]
    # --set-overfit stays with the overfit points; the main points keep the report's model
    assert all(p.run_config["model-image-encoder"] == "patches" for p in main_points)
    for bad, message in (("--overfit-epsilons", "epsilon must be > 0"),
                         ("--overfit-learning-rate", "positive number"),
                         ("--overfit-optimizer", "invalid choice: '0'")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["privacy-sweep", bad, "0"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="set by the overfit options"):
        OverfitSettings(run_config={"optimizer": "sgd"})
    with pytest.raises(ValueError, match="overfit optimizer must be one of"):
        OverfitSettings(optimizer="rmsprop")


def test_report_of_the_committed_overfit_points_at_four_epsilons(tmp_path: Path) -> None:
    """The report reads finished points as their JSON holds them ("inf" as a string)."""
    from fedmm.simulations.privacy.sweep_report import write_sweep_report

    points = PROJECT_ROOT / "docs" / "privacy-report" / "overfit-under-dp" / "points"
    names = ["overfit-iid-eps-inf", "overfit-iid-eps-8", "overfit-iid-eps-3", "overfit-iid-eps-1"]
    results = [json.loads((points / f"{name}.json").read_text()) for name in names]
    assert results[0]["epsilon_target"] == "inf"  # what the report must cope with
    paths = write_sweep_report(results, settings={}, out=tmp_path)
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [r["point"] for r in rows] == names
    assert [r["epsilon_target"] for r in rows] == ["inf", 8.0, 3.0, 1.0]
    table = paths["markdown"].read_text()
    assert all(f"| {name} |" in table for name in names)
    for plot in ("accuracy_plot", "roc_plot"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
