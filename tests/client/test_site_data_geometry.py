"""A site loads its imagefolder at the run's image size and channels; the built-in benchmark
is 28x56 grayscale only and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from client import site_data
from client.site_data import DEID_DIR_ENV, DEID_POLICY_ENV, SiteDataError, load_site_data
from common.data.openclipart import OPENCLIPART_ROOT
from common.federation_config import FederationConfig
from common.model import CrossAttentionMatcher
from common.train_request import TrainRequest

needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)


def _request(**overrides: object) -> TrainRequest:
    return TrainRequest.for_round(FederationConfig.from_run_config(overrides), 1)


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEID_POLICY_ENV, raising=False)
    monkeypatch.delenv(DEID_DIR_ENV, raising=False)
    site_data._memo.clear()


@pytest.fixture()
def colour_site(tmp_path: Path) -> dict[str, str]:
    """A site imagefolder of four opaque RGB drawings from OpenClipart."""
    root = tmp_path / "site"
    root.mkdir()
    chosen = []
    for path in sorted((OPENCLIPART_ROOT / "png").glob("*/*.png")):
        if path.is_symlink() or path.stat().st_size > 100_000:  # a few are 100M+ pixels
            continue
        with Image.open(path) as image:
            if image.mode == "RGB" and max(image.size) < 600:
                chosen.append(path)
        if len(chosen) == 4:
            break
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
    data = load_site_data(colour_site, request)
    assert data.images.shape == (4, 32, 48, 3)
    model = CrossAttentionMatcher(request.model_config())
    assert model.encode_images(torch.from_numpy(data.images)).keys.shape[0] == 4

    gray = load_site_data(colour_site, _request())  # the default: 28x56 grayscale
    assert gray.images.shape == (4, 28, 56)


def test_the_benchmark_refuses_another_geometry_naming_the_keys() -> None:
    node_config = {"partition-id": 0, "num-partitions": 10}
    with pytest.raises(SiteDataError, match=r"28x56 grayscale.*image-size = '64x64'.*imagefolder"):
        load_site_data(node_config, _request(**{"image-size": "64x64", "model-patch-size": 8}))
