"""A site's scattering features: computed once, cached encrypted, read back exactly.

Runs kymatio's real transform on small random images (the built-in 28x56 grey geometry and a
32x32 RGB one) and the site's real encrypted cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.client.feature_cache import FEATURES_DIR
from fedmm.client.scattering_cache import warm_scattering_features
from fedmm.common import scattering
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.model import unit_images
from fedmm.common.model_config import ModelConfig

SECRET = bytes(range(32))
GREY = ModelConfig(image_encoder="scatter-linear", image_layers=0)
RGB = ModelConfig(
    image_encoder="scatter-linear",
    image_layers=0,
    image_height=32,
    image_width=32,
    image_channels=3,
)


def _records(config: ModelConfig, n: int = 12, seed: int = 0) -> ImageTextDataset:
    shape = (n, *config.image_size) + ((3,) if config.image_channels == 3 else ())
    images = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    return ImageTextDataset(images, [f"caption {i}" for i in range(n)], np.zeros(n, np.int64))


@pytest.fixture(autouse=True)
def _fresh_memo():
    scattering._memo.clear()  # each test starts as a new process would
    yield
    scattering._memo.clear()


def _warm(records: ImageTextDataset, cache: Path, config: ModelConfig = GREY) -> bool | None:
    return warm_scattering_features(
        records, config=config, cache_dir=cache, secret=SECRET, retention_days=30
    )


def _reference(records: ImageTextDataset, config: ModelConfig) -> torch.Tensor:
    images = unit_images(torch.from_numpy(records.images), config)
    height, width = config.image_size
    transform = scattering._transform(height, width)
    with torch.no_grad():
        return transform(images).flatten(1, 2)


def _entry_files(cache: Path) -> list[Path]:
    return [p for p in (cache / FEATURES_DIR).rglob("*") if p.is_file()]


@pytest.mark.parametrize("config", [GREY, RGB], ids=["grey-28x56", "rgb-32x32"])
def test_features_are_computed_once_then_read_back_exactly(
    tmp_path: Path, config: ModelConfig
) -> None:
    records = _records(config)
    assert _warm(records, tmp_path, config) is True  # computed and stored
    assert _warm(records, tmp_path, config) is None  # this process has them all
    scattering._memo.clear()  # the next process (another actor, a new site process)
    assert _warm(records, tmp_path, config) is False  # read from the cache
    images = unit_images(torch.from_numpy(records.images), config)
    assert scattering.memoised(images)
    assert torch.equal(scattering.scattering_features(images), _reference(records, config))


def test_the_cached_features_are_encrypted_at_rest(tmp_path: Path) -> None:
    records = _records(GREY)
    _warm(records, tmp_path)
    plain = _reference(records, GREY)[0].numpy().tobytes()[:64]
    files = _entry_files(tmp_path)
    assert files and not any(plain in path.read_bytes() for path in files)
    folders = {path.parent for path in files} | {tmp_path / FEATURES_DIR}
    assert all(folder.stat().st_mode & 0o077 == 0 for folder in folders)  # owner only


def test_a_tampered_entry_is_rebuilt_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = _records(GREY)
    _warm(records, tmp_path)
    largest = max(_entry_files(tmp_path), key=lambda p: p.stat().st_size)
    blob = bytearray(largest.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    largest.write_bytes(bytes(blob))
    scattering._memo.clear()
    with caplog.at_level(logging.WARNING):
        assert _warm(records, tmp_path) is True  # rebuilt
    assert "integrity" in caplog.text
    images = unit_images(torch.from_numpy(records.images), GREY)
    assert torch.equal(scattering.scattering_features(images), _reference(records, GREY))


def test_other_records_get_a_new_entry_that_replaces_the_old_one(tmp_path: Path) -> None:
    _warm(_records(GREY, seed=0), tmp_path)
    first = {p.parent.name for p in _entry_files(tmp_path) if p.parent != tmp_path}
    scattering._memo.clear()
    assert _warm(_records(GREY, n=11, seed=0), tmp_path) is True  # one record withdrawn
    second = {p.parent.name for p in _entry_files(tmp_path) if p.parent != tmp_path}
    assert first and second and not first & second  # the old entry is gone


def test_a_model_without_a_scattering_encoder_caches_nothing(tmp_path: Path) -> None:
    assert _warm(_records(GREY), tmp_path, ModelConfig()) is None
    assert not (tmp_path / FEATURES_DIR).exists()


def test_features_that_do_not_match_the_images_are_refused() -> None:
    images = unit_images(torch.from_numpy(_records(GREY, n=3).images), GREY)
    with pytest.raises(ValueError, match="do not match"):
        scattering.remember_scattering_features(images, torch.zeros(2, 81, 7, 14))
