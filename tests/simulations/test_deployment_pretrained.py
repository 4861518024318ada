"""A deployed federation (real SuperLink and SuperNodes on loopback, ``fedmm coordinator
submit``) with frozen pretrained encoders named in the run config.

Each site keeps its own copy of the weights in its ``[pretrained] weights-dir`` (the
coordinator's copy is at the path the run names: it loads it only to learn the feature
widths). Three sites with colour drawings train a round of DP-SGD on their cached features
under SecAgg+ (two rounds: the first computes the features, the second reads them) and
return federated evaluation on their held-out features; a fourth site
whose copy of a weight file differs from the run's pin refuses with the public code
``frozen-weights`` (its path and the digests stay in its own log) and the round goes on
without it. Each message runs in a fresh ClientApp process at a site, so the features are
computed once and read back from the site's encrypted cache by later messages. With LoRA
adapters (``model-lora-blocks``) the sites train the adapters with the head, and those alone
are sent and saved.

Another run-config case is one more entry of :data:`RUN_CASES`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedmm.client.site_audit import read_audit_log
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.simulations.loopback_daemons import wait_until
from tests.client.site_fixtures import GOOD, make_site, small_colour_drawings
from tests.simulations.test_deployment_loopback import (  # noqa: F401 (the fixture)
    FEDMM,
    Coordinator,
    _rows,
    _write_colour_imagefolder,
    coordinator,
)
from tests.simulations.test_simulate_pretrained import _random_encoders

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
    ),
]

#: case -> (the encoder pair ``fedmm random-encoders`` writes, extra run-config entries).
RUN_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "open_clip-frozen": ("open_clip", ()),
    "timm+hf-frozen": ("timm+hf", ()),
    # LoRA adapters (rank 4) on the last block of both OpenCLIP towers: the sites cache the
    # states entering that block and train it with the head
    "open_clip-lora": ("open_clip", ("model-lora-blocks=1", "model-lora-rank=4")),
}
TRAINING_SITES = ("site-a", "site-b", "site-c")
MISMATCHED_SITE = "site-d"
RECORDS_PER_SITE = 30

PRETRAINED_SITE = GOOD.replace("min-threshold = 3", "min-threshold = 2") + (
    '\n[pretrained]\nweights-dir = "weights"\n'
)


def _copy_weights(run_path: str, site_root: Path, *, mismatched: bool) -> Path:
    """The site's own copy of the weights the run names, in its weights-dir; with
    ``mismatched``, one byte of its largest file changed (another checkpoint's weights)."""
    source = Path(run_path)
    target = site_root / "weights" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    if mismatched:
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        largest = max(files, key=lambda p: p.stat().st_size)
        data = bytearray(largest.read_bytes())
        data[len(data) // 2] ^= 0x01
        largest.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_deployed_sites_train_over_frozen_encoders_and_a_mismatched_copy_is_refused(
    coordinator: Coordinator,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    case: str,
) -> None:
    pair, extra = RUN_CASES[case]
    keys = _random_encoders(tmp_path)[pair]  # the coordinator's copy: the run's paths
    weight_paths = {keys[k] for k in ("model-image-weights", "model-text-weights") if k in keys}
    drawings = small_colour_drawings(
        RECORDS_PER_SITE * (len(TRAINING_SITES) + 1), modes=("RGB", "RGBA")
    )
    daemons = {}
    for index, name in enumerate((*TRAINING_SITES, MISMATCHED_SITE)):
        root = tmp_path / name
        config = make_site(root, PRETRAINED_SITE)
        (root / "data" / "metadata.jsonl").unlink()
        (root / "data").rmdir()
        start = RECORDS_PER_SITE * index
        _write_colour_imagefolder(root / "data", drawings[start : start + RECORDS_PER_SITE])
        for path in sorted(weight_paths):
            _copy_weights(path, root, mismatched=name == MISMATCHED_SITE)
        coordinator.register(root / "keys" / "site-auth-key.pub", name)
        daemons[name] = coordinator.start_site(name, config)
    assert wait_until(lambda: coordinator.online() == len(daemons), timeout=180, interval=2), (
        coordinator.nodes()
    )
    bank = tmp_path / "caption-bank.txt"
    things = ("house", "tree", "car", "cat", "flower", "boat", "star", "bird", "cup", "hat")
    bank.write_text("".join(f"a drawing of a {a} next to a {b}\n" for a in things for b in things))
    out = tmp_path / "run"
    submit = [FEDMM, "coordinator", "submit", "--connection", "coordinator", "--out-dir", str(out)]
    settings = [
        *(f"{key}={value}" for key, value in keys.items()),
        "num-server-rounds=2",
        f"min-available-sites={len(daemons)}",
        f"min-train-sites={len(TRAINING_SITES)}",
        f"caption-bank={bank}",
        "num-distractors=3",
        "eval-fraction=0.3",
        "epsilon=8.0",
        "batch-size=10",
        "learning-rate=1.0",
        "model-width=16",
        "model-heads=2",
        "distractor-word-lists=colours",
        "secure-aggregation=true",
        "round-timeout=300.0",
        "secagg-stage-timeout=180.0",
        *extra,
    ]
    for setting in settings:
        submit += ["--set", setting]
    done = subprocess.run(submit, env=coordinator.env, capture_output=True, text=True, timeout=1200)
    coordinator.group.remember_children()
    log = done.stdout + done.stderr
    context = f"{log[-4000:]}\n" + "\n".join(
        f"--- {name}\n{d.output()[-3000:]}" for name, d in daemons.items()
    )
    assert done.returncode == 0, context
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2], rows
    for row in rows:
        assert not row.get("aborted"), row
        assert (row["sites_trained"], row["sites_refused"]) == (len(TRAINING_SITES), 1), row
        assert {"train.secagg_setup", "train.secagg_unmask"} <= set(row["secagg_stage_s"]), row
    row = rows[-1]
    evaluation = row["federated_eval"]
    assert evaluation["sites_evaluated"] == len(TRAINING_SITES), evaluation
    assert evaluation["records"] > 0, evaluation
    assert evaluation["caption_bank_records"] == evaluation["records"], evaluation
    # The refusal reaches the coordinator as its code only; the site says why in its log.
    assert f"({MISMATCHED_SITE}) refused round 1: frozen-weights" in log, context
    assert str(tmp_path / MISMATCHED_SITE) not in log
    mismatched = daemons[MISMATCHED_SITE].output()
    assert "frozen-weights" in mismatched and "the run pins" in mismatched, mismatched[-3000:]
    assert not (tmp_path / MISMATCHED_SITE / "state" / "privacy-ledger.json").exists()
    audit = read_audit_log(tmp_path / MISMATCHED_SITE / "state" / "site-audit.jsonl").events
    refused = {(e.get("message_type"), e.get("code")) for e in audit}
    assert refused == {
        ("train.secagg_setup", "frozen-weights"),
        ("evaluate.secagg_setup", "frozen-weights"),
    }, audit
    # Features were computed once per site (both rounds and the evaluation used them) and
    # cached encrypted beside its records (0700), where a restarted runner finds them.
    extraction_s, training_task_s = [], []
    for name in TRAINING_SITES:
        said = daemons[name].output()
        computed = re.findall(
            rf"features of {RECORDS_PER_SITE} records computed in ([0-9.]+) s", said
        )
        assert len(computed) == 1, said[-3000:]
        extraction_s.append(float(computed[0]))
        # The warm runner's time for each round's training task (its first one imports the
        # encoders' libraries and loads them).
        ran = re.findall(r"train\.secagg_setup: pulled in [0-9.]+ s, ran in ([0-9.]+) s", said)
        training_task_s.append([float(x) for x in ran])
        features = tmp_path / name / "cache" / "features"
        assert features.is_dir() and any(features.iterdir()), name
        assert features.stat().st_mode & 0o077 == 0, name
    # The figures docs/results.md quotes (pytest -rP shows them).
    print(
        json.dumps(
            {
                "case": case,
                "round_s": [r["wall_s"] for r in rows],
                "secagg_stage_s": [r["secagg_stage_s"] for r in rows],
                "feature_extraction_s": extraction_s,
                "site_training_task_s": training_task_s,
                "eval_records": evaluation["records"],
                "load_average": [round(x, 1) for x in os.getloadavg()],
            }
        )
    )
    config = json.loads((out / "model-config.json").read_text())
    assert config["image_encoder"] == keys["model-image-encoder"]
    assert config["image_weights_sha256"] == keys["model-image-weights-sha256"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as model:
        tensors = {n: model.get_tensor(n) for n in model.keys()}  # noqa: SIM118
    head = {n for n in tensors if n.split(".")[0] in {"image_head", "text_head"}}
    head |= {n for n in tensors if n.startswith("cross_")}
    adapters = set(tensors) - head
    assert head, sorted(tensors)
    if "model-lora-blocks=1" in extra:
        # the head and the adapters alone travelled and were saved, and the sites trained
        # the adapters (B starts at zero)
        assert config["lora_blocks"] == 1
        assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters), adapters
        assert all(abs(tensors[n]).max() > 0 for n in adapters if ".lora_B." in n)
    else:
        assert not adapters, adapters  # only the trained fusion head travelled and was saved
