"""A site loads its imagefolder at the run's image size and channels and trains on it with the
run's caption bank; the built-in benchmark is 28x56 grayscale only and says so."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from fedmm.client import site_data
from fedmm.client.deid.site_secret import SITE_SECRET_BYTES
from fedmm.client.privacy_ledger import PrivacyLedger, epsilon_of
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.site_data import SiteDataError, load_site_data, load_site_records
from fedmm.client.training_round import run_training_round
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.site_refusal import RefusalCode
from fedmm.common.train_request import TrainRequest
from fedmm.simulations.benchmarks.openclipart_imagefolder import build_openclipart_benchmark
from tests.client.site_fixtures import small_colour_drawings

needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)


def _request(**overrides: object) -> TrainRequest:
    return TrainRequest.for_round(FederationConfig.from_run_config(overrides), 1)


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    site_data._memo.clear()


@pytest.fixture()
def colour_site(tmp_path: Path) -> dict[str, str]:
    """A site imagefolder of four opaque RGB drawings from OpenClipart."""
    root = tmp_path / "site"
    root.mkdir()
    chosen = small_colour_drawings(4)
    lines = []
    for i, path in enumerate(chosen):
        shutil.copyfile(path, root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"drawing {path.stem}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "imagefolder": str(root),
        "site-secret": str(tmp_path / "secret"),
        "deid-cache-dir": str(tmp_path / "cache"),
    }


@needs_openclipart
def test_site_images_arrive_at_the_runs_size_and_channels(colour_site: dict[str, str]) -> None:
    request = _request(**{"image-size": "32x48", "image-channels": 3, "model-patch-size": 8})
    data = load_site_records(colour_site, request)  # held-out records too
    assert data.images.shape == (4, 32, 48, 3)
    model = CrossAttentionMatcher(request.model_config())
    assert model.encode_images(torch.from_numpy(data.images)).keys.shape[0] == 4

    gray = load_site_records(colour_site, _request())  # the default: 28x56 grayscale
    assert gray.images.shape == (4, 28, 56)


def test_the_benchmark_refuses_another_geometry_naming_the_keys() -> None:
    node_config = {"partition-id": 0, "num-partitions": 10}
    with pytest.raises(SiteDataError, match=r"28x56 grayscale.*image-size = '64x64'.*imagefolder"):
        load_site_data(node_config, _request(**{"image-size": "64x64", "model-patch-size": 8}))


@needs_openclipart
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_a_site_trains_on_real_colour_records_with_the_runs_caption_bank(tmp_path: Path) -> None:
    """OpenClipart records and bank, through the wire and the site's whole round: its
    imagefolder at 32x32 RGB, DP-SGD with bank distractors; a bank altered in transit
    stops the site before it trains."""
    build_openclipart_benchmark(tmp_path / "oc", per_category=4)
    config = FederationConfig.from_run_config(
        {
            "image-size": "32x32",
            "image-channels": 3,
            "model-patch-size": 8,
            "model-width": 16,
            "model-caption-words": 24,
            "model-vocab-buckets": 4096,
            "caption-bank": str(tmp_path / "oc" / "caption-bank.txt"),
            "distractor-word-lists": "colours,positions",
            "num-distractors": 2,
            "batch-size": 16,
            "epsilon": 8.0,
            "num-server-rounds": 1,
        }
    )
    sent = TrainRequest.for_round(config, 1)
    request = TrainRequest.from_config(dict(ConfigRecord(sent.to_config())))
    # A fixed site secret: the held-out split (keyed by it) is then the same in every run.
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(SITE_SECRET_BYTES)))
    secret.chmod(0o600)
    node_config = {
        "imagefolder": str(tmp_path / "oc" / "train"),
        "site-secret": str(secret),
        "deid-cache-dir": str(tmp_path / "cache"),
    }
    data = load_site_data(node_config, request)  # its training records
    assert data.images.shape[1:] == (32, 32, 3) and len(data) > 40
    torch.manual_seed(0)
    global_state = CrossAttentionMatcher(request.model_config()).state_dict()
    ledger = PrivacyLedger()
    outcome = run_training_round(
        global_state=global_state,
        request=request,
        data=data,
        policy=SitePrivacyPolicy(),
        ledger=ledger,
    )
    assert outcome.update is not None, outcome.refusal
    assert ledger.rounds == [1]
    assert 0 < epsilon_of(ledger.history, config.delta) <= 8.0 * (1 + 1e-9)
    assert all(torch.isfinite(v).all() for v in outcome.update.values())
    assert any(float(v.abs().max()) > 0 for v in outcome.update.values())

    altered = TrainRequest.from_config(
        {**sent.to_config(), "caption_bank_zlib": zlib.compress(b"a forged caption\n" * 9)}
    )
    fresh = PrivacyLedger()
    refused = run_training_round(
        global_state=global_state,
        request=altered,
        data=data,
        policy=SitePrivacyPolicy(),
        ledger=fresh,
    )
    assert refused.update is None and refused.refusal is not None
    assert refused.refusal.code == RefusalCode.BAD_REQUEST
    assert "altered or cut in transit" in refused.refusal.detail
    assert fresh == PrivacyLedger()  # refused before any spend: no count drawn, no round
