"""The built-in benchmark: Fashion-MNIST turned into image-text records.

Every record is a 28x56 canvas. A single item sits in the middle; a two-item scene has one
item on each half. Each source image is used by at most one record, so one record is one
privacy unit. Scene records take ``scene_fraction`` of the source images (in pairs).
Labels are the class of the single item, or of the left item of a scene. A share
``pii_fraction`` of the training captions carry synthetic personal data after the item
description (``common.data.synthetic_pii``), so that simulated sites exercise their
de-identification; the test set never does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmm.common.data.captions import scene_caption, single_caption
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.fashion_mnist import load_fashion_mnist
from fedmm.common.data.synthetic_pii import DEFAULT_PII_FRACTION, add_synthetic_personal_data

ITEM_SIZE = 28
CANVAS_SHAPE = (28, 56)


def single_canvas(images: np.ndarray) -> np.ndarray:
    """Items ``(N, 28, 28)`` centred on ``(N, 28, 56)`` black canvases."""
    out = np.zeros((len(images), *CANVAS_SHAPE), dtype=np.uint8)
    out[:, :, 14:42] = images
    return out


def scene_canvas(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two items side by side, ``(N, 28, 56)``."""
    return np.concatenate([left, right], axis=2).astype(np.uint8)


def _records(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    scene_fraction: float,
    seed: int,
    pii_fraction: float = 0.0,
) -> ImageTextDataset:
    if not 0.0 <= scene_fraction <= 1.0:
        raise ValueError(f"scene_fraction must be in [0, 1], got {scene_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_scene_sources = round(scene_fraction * len(images)) // 2 * 2
    scene_idx, single_idx = order[:n_scene_sources], order[n_scene_sources:]
    left, right = scene_idx[0::2], scene_idx[1::2]
    canvases = np.concatenate(
        [single_canvas(images[single_idx]), scene_canvas(images[left], images[right])]
    )
    captions = [single_caption(int(labels[i]), images[i], rng) for i in single_idx]
    captions += [
        scene_caption((int(labels[a]), images[a]), (int(labels[b]), images[b]), rng)
        for a, b in zip(left, right, strict=True)
    ]
    if pii_fraction:  # its own random stream: the other captions stay as they were
        captions = add_synthetic_personal_data(captions, fraction=pii_fraction, seed=seed)
    record_labels = np.concatenate([labels[single_idx], labels[left]]).astype(np.int64)
    return ImageTextDataset(images=canvases, captions=captions, labels=record_labels)


@lru_cache(maxsize=4)
def benchmark_train_records(
    data_dir: str | None = None,
    *,
    scene_fraction: float = 0.2,
    seed: int = 0,
    pii_fraction: float = DEFAULT_PII_FRACTION,
) -> ImageTextDataset:
    """All training records of the benchmark (every site takes its partition of these);
    ``pii_fraction`` of the captions carry synthetic personal data (0 for none)."""
    images, labels = load_fashion_mnist("train", data_dir)
    return _records(
        images, labels, scene_fraction=scene_fraction, seed=seed, pii_fraction=pii_fraction
    )


@dataclass(frozen=True)
class BenchmarkTestSet:
    """Held-out evaluation data from the official test split."""

    singles: np.ndarray  # (N, 28, 56) uint8 canvases
    single_labels: np.ndarray  # (N,)
    scenes: np.ndarray  # (S, 28, 56) uint8
    scene_captions: list[str]
    scene_pairs: np.ndarray  # (S, 2) classes (left, right)

    def first_singles(self, count: int) -> BenchmarkTestSet:
        """The same set with only the first ``count`` single items (quicker evaluation)."""
        return replace(self, singles=self.singles[:count], single_labels=self.single_labels[:count])


@lru_cache(maxsize=2)
def benchmark_test_set(
    data_dir: str | Path | None = None, *, num_scenes: int = 1000, seed: int = 12345
) -> BenchmarkTestSet:
    """The 10k test items for caption ranking and ``num_scenes`` scenes for retrieval."""
    images, labels = load_fashion_mnist("test", data_dir)
    if 2 * num_scenes > len(images):
        raise ValueError(f"num_scenes must be at most {len(images) // 2}")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(images))[: 2 * num_scenes]
    left, right = pick[0::2], pick[1::2]
    captions = [
        scene_caption((int(labels[a]), images[a]), (int(labels[b]), images[b]), rng)
        for a, b in zip(left, right, strict=True)
    ]
    return BenchmarkTestSet(
        singles=single_canvas(images),
        single_labels=labels,
        scenes=scene_canvas(images[left], images[right]),
        scene_captions=captions,
        scene_pairs=np.stack([labels[left], labels[right]], axis=1),
    )
