"""``fedmm simulate --site-data``: three folders of real OpenClipart drawings (40 each, 32x32
colour) as three simulated sites, 2 rounds with DP-SGD and SecAgg+ through Flower's
simulation runtime (Ray, real ClientApps, Opacus), then a resume; every round ends with a
federated evaluation summed under SecAgg+, in ``metrics.jsonl`` and the report. One folder
split into sites by ``--sites``/``--partition`` is checked without running Flower."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.federation_config import ConfigError
from fedmm.simulations.site_folders import simulated_site_folders
from tests.simulations.marked_processes import new_marker, none_left

pytestmark = pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)
FEDERATED_KEYS = (
    "records",
    "r_at_1_i2t",
    "r_at_5_i2t",
    "r_at_10_i2t",
    "r_at_1_t2i",
    "r_at_5_t2i",
    "r_at_10_t2i",
    "chance_r_at_10",
    "r_at_10_i2t_shuffled",
)


def _folders(root: Path, count: int, per_folder: int) -> list[Path]:
    """``count`` imagefolders of distinct OpenClipart PNGs, captioned by their file names
    and labelled by their top-level category."""
    png = OPENCLIPART_ROOT / "png"
    files = sorted(p for p in png.rglob("*.png") if not p.is_symlink())[::7]
    folders = []
    for index in range(count):
        folder = root / f"folder-{index}"
        (folder / "images").mkdir(parents=True)
        lines = []
        for i, path in enumerate(files[index * per_folder : (index + 1) * per_folder]):
            shutil.copyfile(path, folder / "images" / f"{i}.png")
            caption = path.stem.replace("_", " ")
            label = path.relative_to(png).parts[0]
            lines.append(
                json.dumps({"file_name": f"images/{i}.png", "text": caption, "label": label})
            )
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        folders.append(folder)
    return folders


def _simulate(out: Path, *args: str, marker: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **marker}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmm.simulations.cli",
            "simulate",
            "--out",
            str(out),
            *args,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).parents[2],
    )


def _first_run(
    tmp_path: Path, marker: dict[str, str], *extra: str, rounds: int = 2
) -> tuple[Path, list[Path]]:
    """Three folders, ``rounds`` rounds at epsilon 8 with SecAgg+ (the default) and the
    ``extra`` options; the run's folder."""
    folders = _folders(tmp_path / "data", 3, 40)
    bank = tmp_path / "bank.txt"
    bank.write_text("".join(f"public drawing number {i}\n" for i in range(40)))
    out = tmp_path / "run"
    settings = [
        *("--set", "image-size=32x32", "--set", "model-width=16", "--set", "batch-size=16"),
        *("--set", f"caption-bank={bank}", "--set", "num-distractors=3"),
        *("--set", "eval-fraction=0.3"),
    ]
    first = _simulate(
        out,
        "--site-data",
        *map(str, folders),
        "--rounds",
        str(rounds),
        "--epsilon",
        "8",
        *settings,
        *extra,
        marker=marker,
    )
    assert first.returncode == 0, first.stderr[-3000:] + (out / "run.log").read_text()[-3000:]
    return out, folders


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_openclipart_folders_give_federated_evaluation(tmp_path: Path) -> None:
    marker = new_marker()
    out, folders = _first_run(tmp_path, marker)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sites_trained"] == 3 for r in rows), rows
    assert "accuracy" not in rows[-1]  # 32x32 colour: no benchmark evaluation
    federated = rows[-1]["federated_eval"]
    assert set(FEDERATED_KEYS) <= set(federated), federated
    assert federated["sites_evaluated"] == 3 and 10 <= federated["records"] <= 60
    assert all(0 <= float(federated[k]) <= 1 for k in FEDERATED_KEYS if k != "records")
    assert "federated_eval" not in rows[0]  # eval-every 5: after the last round only
    report = (out / "report.md").read_text()
    assert "Federated evaluation" in report and (out / "federated-recall.png").exists()
    config = json.loads((out / "run-config.json").read_text())
    assert config["image-channels"] == 3 and config["image-size"] == "32x32"
    assert [Path(f) for f in json.loads((out / "site-data.json").read_text())["folders"]] == [
        f.resolve() for f in folders
    ]
    assert none_left(marker), "the simulation left processes (Ray's included) behind"


def test_active_coordinator_mode_covers_the_evaluation_sum_too(tmp_path: Path) -> None:
    """With active-coordinator mode on, the evaluation's SecAgg+ sum runs the consistency
    exchange as the training sum does (signed survivor sets before unmasking), and the
    sites' counts still add up."""
    out, _folders = _first_run(
        tmp_path, new_marker(), "--set", "secagg-active-coordinator=true", rounds=1
    )
    [row] = _rows(out)
    assert row["sites_trained"] == 3 and "train.secagg_consistency" in row["secagg_stage_s"]
    federated = row["federated_eval"]
    assert federated["sites_evaluated"] == 3, federated
    assert "evaluate.secagg_consistency" in federated["secagg_stage_s"], federated
    assert federated["records"] > 0 and 0 <= federated["r_at_10_i2t"] <= 1


@pytest.mark.slow
def test_a_site_data_run_resumes_on_the_same_folders(tmp_path: Path) -> None:
    marker = new_marker()
    out, _folders_used = _first_run(tmp_path, marker)
    resumed = _simulate(out, "--resume", "--rounds", "3", marker=marker)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["federated_eval"]["sites_evaluated"] == 3  # the sites' folders again
    assert none_left(marker), "the simulation left processes (Ray's included) behind"


def test_one_folder_is_split_into_sites(tmp_path: Path) -> None:
    (folder,) = _folders(tmp_path / "data", 1, 60)
    out = tmp_path / "run"
    out.mkdir()
    sites = simulated_site_folders([folder], out, num_sites=3, scheme="iid", alpha=0.3, seed=0)
    names = [
        {json.loads(line)["file_name"] for line in (s / "metadata.jsonl").read_text().splitlines()}
        for s in sites
    ]
    assert sum(map(len, names)) == 60 and not names[0] & names[1]
    again = simulated_site_folders([folder], out, num_sites=3, scheme="iid", alpha=0.3, seed=0)
    assert again == sites  # the same split: --resume finds it
    with pytest.raises(ConfigError, match=r"--sites 2 with 3 --site-data folders"):
        simulated_site_folders(sites, out, num_sites=2, scheme="iid", alpha=0.3, seed=0)
    with pytest.raises(ConfigError, match=r"no metadata\.jsonl"):
        simulated_site_folders([tmp_path], out, num_sites=None, scheme="iid", alpha=0.3, seed=0)
