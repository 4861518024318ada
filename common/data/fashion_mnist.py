"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", 2017 (MIT licence). The official 10k test split is held out for
evaluation and never used for training.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMnistNotFoundError(FileNotFoundError):
    """The IDX files are not where they were looked for."""


def _read_idx(path: Path, *, offset: int, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {magic:#x})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


def load_fashion_mnist(
    split: Literal["train", "test"], data_dir: Path | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)`` of one official split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    image_file, label_file = (root / name for name in _FILES[split])
    missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
    if missing:
        raise FashionMnistNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (files land in "
            f"{DEFAULT_DATA_DIR}) or pass --data-dir pointing to a folder with the four "
            "IDX .gz files."
        )
    images = _read_idx(image_file, offset=16, expected_magic=0x803).reshape(-1, 28, 28)
    labels = _read_idx(label_file, offset=8, expected_magic=0x801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} and {label_file} disagree on the number of records")
    return images, labels
