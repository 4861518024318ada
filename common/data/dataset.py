"""The in-memory form of an image-text dataset that every data source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_LABEL = -1


@dataclass(frozen=True)
class ImageTextDataset:
    """Images with one caption each and an optional class label.

    ``images`` is ``uint8`` of shape ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB);
    ``captions`` has N strings; ``labels`` is ``int64`` of shape ``(N,)`` holding
    ``NO_LABEL`` where a record has none.
    """

    images: np.ndarray
    captions: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.captions)
        grayscale = self.images.ndim == 3
        rgb = self.images.ndim == 4 and self.images.shape[3] == 3
        if self.images.dtype != np.uint8 or not (grayscale or rgb):
            raise ValueError(
                f"images must be uint8 of shape (N, H, W) or (N, H, W, 3), got "
                f"{self.images.dtype} {self.images.shape}"
            )
        if self.images.shape[0] != n or self.labels.shape != (n,):
            raise ValueError(
                f"images ({self.images.shape[0]}), captions ({n}) and labels "
                f"({self.labels.shape}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_channels(self) -> int:
        """1 for grayscale images, 3 for RGB."""
        return 1 if self.images.ndim == 3 else self.images.shape[3]

    def subset(self, indices: np.ndarray) -> ImageTextDataset:
        """The records at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageTextDataset(
            images=self.images[indices],
            captions=[self.captions[i] for i in indices],
            labels=self.labels[indices],
        )
