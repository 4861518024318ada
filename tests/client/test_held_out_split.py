"""The held-out split (``client.held_out_split``): stable under the site's key, another key
draws another split, one record never moves another, and the site's real training path
(the ClientApp's ``train`` handler, Opacus DP-SGD) never puts a held-out record into a
batch."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.app import app
from fedmm.client.held_out_split import held_out_mask, record_digest, split_records
from fedmm.client.site_data import load_site_split
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.site_task import SiteTask, task_config
from fedmm.common.train_request import TrainRequest

needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _records(n: int, seed: int = 0) -> ImageTextDataset:
    rng = np.random.default_rng(seed)
    return ImageTextDataset(
        images=rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8),
        captions=[f"record {i}" for i in range(n)],
        labels=np.full(n, -1, dtype=np.int64),
    )


def test_the_split_is_stable_under_a_key_and_changes_with_another() -> None:
    data = _records(3000)
    key, other = b"k" * 32, b"o" * 32
    first = held_out_mask(data, site_secret=key, fraction=0.2)
    assert np.array_equal(first, held_out_mask(data, site_secret=key, fraction=0.2))
    assert abs(first.mean() - 0.2) < 0.03  # 3000 records: sd 0.007
    second = held_out_mask(data, site_secret=other, fraction=0.2)
    assert abs(second.mean() - 0.2) < 0.03
    assert (first != second).mean() > 0.2  # independent splits differ in about 32%
    # A larger fraction only adds records: the hash decides each record's place alone.
    assert not (first & ~held_out_mask(data, site_secret=key, fraction=0.5)).any()


def test_adding_or_removing_a_record_moves_no_other_record() -> None:
    data, key = _records(500), b"s" * 32
    mask = held_out_mask(data, site_secret=key, fraction=0.3)
    fewer = data.subset(np.arange(1, 500))
    assert np.array_equal(held_out_mask(fewer, site_secret=key, fraction=0.3), mask[1:])
    split = split_records(data, site_secret=key, fraction=0.3)
    assert len(split.train) + len(split.held_out) == 500
    held = {
        record_digest(i, c)
        for i, c in zip(split.held_out.images, split.held_out.captions, strict=True)
    }
    trained = {
        record_digest(i, c) for i, c in zip(split.train.images, split.train.captions, strict=True)
    }
    assert held and not held & trained


@pytest.fixture
def clipart_site(tmp_path: Path) -> dict[str, str]:
    """A site's imagefolder of 48 distinct OpenClipart images with their file names as
    captions, and the site's secret, cache, policy and ledger."""
    root = tmp_path / "site"
    root.mkdir()
    chosen = sorted(p for p in (OPENCLIPART_ROOT / "png").rglob("*.png") if not p.is_symlink())
    chosen = chosen[::5][:48]
    lines = []
    for i, path in enumerate(chosen):
        shutil.copyfile(path, root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a drawing {path.stem}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "policy.toml").write_text("[privacy]\nmax-epsilon = 8.0\n")
    return {
        "imagefolder": str(root),
        "site-secret": str(tmp_path / "secret"),
        "deid-cache-dir": str(tmp_path / "cache"),
        "policy-file": str(tmp_path / "policy.toml"),
        "ledger-file": str(tmp_path / "ledger.json"),
    }


def _config(bank: Path) -> FederationConfig:
    return FederationConfig.from_run_config(
        {
            "image-size": "32x32",
            "image-channels": 3,
            "model-patch-size": 8,
            "model-width": 8,
            "distractor-word-lists": "none",
            "caption-bank": str(bank),
            "num-distractors": 2,
            "batch-size": 8,
            "local-epochs": 3,
            "epsilon": 8.0,
            "num-server-rounds": 1,
            "eval-fraction": 0.3,
        }
    )


@needs_openclipart
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_held_out_records_never_reach_a_training_batch(
    clipart_site: dict[str, str], tmp_path: Path
) -> None:
    bank = tmp_path / "bank.txt"
    bank.write_text("".join(f"public caption {i}\n" for i in range(20)))
    request = TrainRequest.for_round(_config(bank), 1)
    split = load_site_split(clipart_site, request)
    assert len(split.held_out) >= 5 and len(split.train) >= 20
    trained = {img.tobytes() for img in split.train.images}
    # Held-out images that no training record shares (clipart repeats some drawings).
    held = {img.tobytes() for img in split.held_out.images} - trained
    assert len(held) >= 5

    seen: list[np.ndarray] = []
    this_thread = threading.get_ident()  # the hook is process-wide: only this test's calls

    def record_inputs(module: torch.nn.Module, args: tuple) -> None:
        ours = threading.get_ident() == this_thread
        if ours and isinstance(module, CrossAttentionMatcher) and args:
            seen.extend(np.asarray(args[0]).copy())

    torch.manual_seed(0)
    model = CrossAttentionMatcher(request.model_config())
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord(task_config(SiteTask.LOCAL_DP_SGD, request.to_config())),
        }
    )
    msg = Message(content, dst_node_id=5, message_type="train", ttl=120)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(
        run_id=7, node_id=5, node_config=dict(clipart_site), state=RecordDict(), run_config={}
    )
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record_inputs)
    try:
        reply = app(msg, context)
    finally:
        hook.remove()
    assert not reply.content.config_records["status"]["refused"]
    assert len(seen) > 3 * len(split.train) // 2  # three epochs of Poisson batches were seen
    seen_bytes = {image.tobytes() for image in seen}
    assert seen_bytes <= trained
    assert not seen_bytes & held
