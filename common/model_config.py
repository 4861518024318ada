"""Sizes of the cross-attention model (torch-free, so messages can carry it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

IMAGE_ENCODERS = ("patches", "conv", "scatter")
#: Hidden activations: GELU, or tanh, the "tempered sigmoid" that Papernot et al. (AAAI 2021)
#: found to train better under DP-SGD (bounded activations keep per-example gradients small,
#: so clipping discards less of them).
ACTIVATIONS = ("gelu", "tanh")
SCATTER_SCALES = 2  # J of the scattering transform (common.scattering)
SCATTER_STRIDE = 2**SCATTER_SCALES  # its grid is 2^J times coarser than the canvas
#: Canvas pixels per token side: the conv encoder halves the canvas three times; the scatter
#: encoder's convolution halves the scattering grid once.
CONV_STRIDE = 8


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
    image_encoder: str = "patches"  # "patches" (linear patch embedding), "conv" or "scatter"
    activation: str = "gelu"  # of the conv stem and the feed-forward layers: ACTIVATIONS

    def __post_init__(self) -> None:
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(
                f"image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the text attends to: one per patch, or one per output cell of the
        conv or scatter encoder's last convolution."""
        if self.image_encoder in ("conv", "scatter"):
            rows = math.ceil(self.image_height / CONV_STRIDE)
            return rows * math.ceil(self.image_width / CONV_STRIDE)
        return self.num_patches

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)
