"""Sizes of the cross-attention model (torch-free, so messages can carry it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the model; the defaults train at useful speed on 2 CPU cores."""

    width: int = 32
    heads: int = 2
    patch_size: int = 7
    image_height: int = 28
    image_width: int = 56
    image_layers: int = 1
    text_layers: int = 1
    mlp_ratio: int = 2
    vocab_buckets: int = 768
    max_len: int = 12

    @property
    def num_patches(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
