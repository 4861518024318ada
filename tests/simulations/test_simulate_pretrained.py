"""``fedmm simulate --site-data`` with frozen pretrained encoders named in the run config: a
small random OpenCLIP checkpoint, and a timm ViT with a BERT text encoder, each saved in its
hub layout (``fedmm random-encoders``). Three OpenClipart folders are three sites; two rounds
of DP-SGD on cached features under SecAgg+, then federated evaluation on held-out features.
Only the fusion head travels: the saved model holds no encoder weight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from tests.simulations.marked_processes import new_marker, none_left
from tests.simulations.test_simulate_site_data import _folders, _rows, _simulate

pytestmark = [
    pytest.mark.skipif(
        not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
    ),
    pytest.mark.slow,
]


def _random_encoders(tmp_path: Path) -> dict[str, dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-m", "fedmm.simulations.cli", "random-encoders", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout)


def _federation(tmp_path: Path, pair: str, *extra: str) -> tuple[Path, dict[str, str], str]:
    """Three folders of drawings, 2 rounds of DP-SGD (epsilon 8) under SecAgg+ over the
    random ``pair`` of ``fedmm random-encoders`` with ``extra`` ``--set`` arguments; checks
    what every such run must show and returns the output folder, the pair's run-config keys
    and the processes' marker."""
    keys = _random_encoders(tmp_path)[pair]
    folders = _folders(tmp_path / "data", 3, 40)
    bank = tmp_path / "bank.txt"
    bank.write_text("".join(f"public drawing number {i}\n" for i in range(40)))
    out = tmp_path / "run"
    settings = [arg for key, value in keys.items() for arg in ("--set", f"{key}={value}")]
    marker = new_marker()
    done = _simulate(
        out,
        "--site-data",
        *map(str, folders),
        "--rounds",
        "2",
        "--epsilon",
        "8",
        *settings,
        *extra,
        *("--set", "model-width=16", "--set", "batch-size=16"),
        *("--set", f"caption-bank={bank}", "--set", "num-distractors=3"),
        *("--set", "eval-fraction=0.3"),
        marker=marker,
    )
    assert done.returncode == 0, done.stderr[-3000:] + (out / "run.log").read_text()[-3000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sites_trained"] == 3 for r in rows), rows
    assert "train.secagg_unmask" in rows[0]["secagg_stage_s"]  # SecAgg+ (the default)
    federated = rows[-1]["federated_eval"]
    assert federated["sites_evaluated"] == 3 and federated["records"] > 0
    assert federated["caption_bank_records"] == federated["records"]
    return out, keys, marker


@pytest.mark.parametrize("pair", ["open_clip", "timm+hf"])
def test_a_federation_trains_a_fusion_head_over_frozen_encoders(tmp_path: Path, pair: str) -> None:
    out, keys, marker = _federation(tmp_path, pair)
    config = json.loads((out / "model-config.json").read_text())
    assert config["image_encoder"] == keys["model-image-encoder"]
    assert config["image_weights_sha256"] == keys["model-image-weights-sha256"]
    assert json.loads(config["image_preprocessing"])["encoder"] == keys["model-image-encoder"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as model:
        names = list(model.keys())
    assert names and all(
        n.split(".")[0] in {"image_head", "text_head"} or n.startswith("cross_") for n in names
    )
    assert none_left(marker), "the simulation left processes (Ray's included) behind"


@pytest.mark.parametrize("pair", ["open_clip", "timm+hf"])
def test_a_federation_trains_lora_adapters_on_the_encoders_last_block(
    tmp_path: Path, pair: str
) -> None:
    """``model-lora-blocks=1``: the head and the adapters (rank 4) on both encoders' last
    block train under DP-SGD and SecAgg+, and they alone travel: the saved model holds the
    head and each adapted layer's ``A`` and ``B``, and no frozen weight."""
    out, _, marker = _federation(
        tmp_path,
        pair,
        *("--set", "model-lora-blocks=1", "--set", "model-lora-rank=4"),
        *("--set", "learning-rate=1.0"),
    )
    config = json.loads((out / "model-config.json").read_text())
    assert config["lora_blocks"] == 1 and config["lora_rank"] == 4
    targets = json.loads(config["lora_targets"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as model:
        names = list(model.keys())
        tensors = {n: model.get_tensor(n) for n in names}
    head = {n for n in tensors if n.split(".")[0] in {"image_head", "text_head"}}
    head |= {n for n in tensors if n.startswith("cross_")}
    adapters = set(tensors) - head
    assert all(".lora_A.default.weight" in n or ".lora_B.default.weight" in n for n in adapters)
    for side in ("image", "text"):
        adapted_layers = {n.split(".lora_")[0] for n in adapters if n.startswith(f"{side}_tail.")}
        # the tail's one block is block 0 of the copy: every target layer, one A and one B
        assert adapted_layers == {f"{side}_tail.blocks.0.{t}" for t in targets[side]["layers"]}
        for layer in adapted_layers:
            a, b = (
                tensors[f"{layer}.lora_A.default.weight"],
                tensors[f"{layer}.lora_B.default.weight"],
            )
            assert a.shape[0] == 4 and b.shape[1] == 4
            assert b.abs().max() > 0, f"{layer}: B starts at zero; the federation trained it"
    assert none_left(marker), "the simulation left processes (Ray's included) behind"
