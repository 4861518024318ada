"""Canaries of the one-run audit: keyed fair inclusion, drawn from records no site trains
on, wrong captions, and each site's folder holding exactly its included canaries."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from fedmm.common.data.captions import CLASS_NAMES, canonical_caption
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.imagefolder import load_imagefolder
from fedmm.common.data.partitioning import partition_indices
from fedmm.simulations.privacy.canaries import (
    draw_canaries,
    inclusion_bits,
    load_or_create_key,
    write_site_folders,
)


def _records(n: int = 3000) -> ImageTextDataset:
    """Single items centred on 28x56 canvases (as the benchmark's), labels 0-9."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 28, 56), dtype=np.uint8)
    images[:, :, 14:42] = rng.integers(1, 255, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return ImageTextDataset(images, [canonical_caption(int(k)) for k in labels], labels)


SPLIT = {"num_sites": 3, "scheme": "iid", "alpha": 0.3, "partition_seed": 0}


def test_key_file_is_private_and_reused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "key")
    assert len(key) == 32 and stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert load_or_create_key(tmp_path / "key") == key


def test_inclusion_bits_are_fair_and_depend_on_the_key() -> None:
    a, b = inclusion_bits(b"a" * 32, 4000), inclusion_bits(b"b" * 32, 4000)
    assert abs(a.mean() - 0.5) < 0.03  # 4 standard deviations
    assert abs((a == b).mean() - 0.5) < 0.03  # another key: independent bits
    assert (inclusion_bits(b"a" * 32, 4000) == a).all()


def test_canaries_come_from_untrained_records_with_a_wrong_caption(tmp_path: Path) -> None:
    records = _records()
    canaries = draw_canaries(records, count=90, records_per_site=200, key=b"k" * 32, **SPLIT)
    trained = np.concatenate(
        [
            partition_indices(
                records.labels, num_partitions=3, partition_id=k, scheme="iid", alpha=0.3, seed=0
            )[:200]
            for k in range(3)
        ]
    )
    assert not set(canaries.source_indices) & set(trained)
    for caption, label in zip(canaries.records.captions, canaries.records.labels, strict=True):
        assert caption != canonical_caption(int(label))
        assert caption in {canonical_caption(k) for k in range(len(CLASS_NAMES))}
    assert (canaries.records.images == records.images[canaries.source_indices]).all()
    assert sorted(set(canaries.sites)) == [0, 1, 2]


def test_each_site_folder_holds_its_records_and_only_its_included_canaries(
    tmp_path: Path,
) -> None:
    records = _records()
    canaries = draw_canaries(records, count=60, records_per_site=100, key=b"k" * 32, **SPLIT)
    folders = write_site_folders(tmp_path, records, canaries, records_per_site=100, **SPLIT)
    saved = json.loads((tmp_path / "canaries.json").read_text())
    assert saved["included"] == canaries.included.tolist()
    for site, folder in enumerate(folders):
        data, _ = load_imagefolder(folder, image_size=(28, 56), channels=1)
        own = partition_indices(
            records.labels, num_partitions=3, partition_id=site, scheme="iid", alpha=0.3, seed=0
        )[:100]
        assert (data.images[:100] == records.images[own]).all()
        mine = (canaries.sites == site) & canaries.included
        assert len(data) == 100 + mine.sum()
        assert (data.images[100:] == canaries.records.images[mine]).all()
        captions = canaries.records.captions
        assert data.captions[100:] == [c for c, m in zip(captions, mine, strict=True) if m]
    # written once: a second call reuses the folders
    assert write_site_folders(tmp_path, records, canaries, records_per_site=100, **SPLIT) == folders


def test_too_few_untrained_records_is_named() -> None:
    with pytest.raises(ValueError, match="--audit-canaries"):
        draw_canaries(_records(700), count=200, records_per_site=200, key=b"k" * 32, **SPLIT)
