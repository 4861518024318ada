"""Sizes of the cross-attention model (torch-free, so messages can carry it).

The image geometry (height, width, channels) and the text geometry (hash buckets, words per
caption) are part of the model: they are saved with every checkpoint and model
(``model-config.json``) and checked whenever images or captions reach it.

Allowed image geometry, and why:

- ``image_channels`` is 1 (grayscale) or 3 (RGB).
- Each side is between ``MIN_IMAGE_SIDE`` and ``MAX_IMAGE_SIDE`` pixels, and the image gives
  at most ``MAX_IMAGE_TOKENS`` tokens: image self-attention costs the square of the token
  count per example, and DP-SGD keeps every example's activations for its per-example
  gradient, so the token count bounds memory and time (a 16x16 token grid).
- ``patches``: both sides are multiples of ``patch_size`` (one token per patch).
- ``conv``: any side; tokens are the ``ceil(H/8) x ceil(W/8)`` cells of its stride-8 stem.
- ``scatter``: both sides are multiples of 4, the grid step of the scattering transform
  (J = 2); tokens as for ``conv``.
- ``scatter-linear``: as ``scatter``; one token, a linear map of all the normalised
  scattering features (its weights grow with the image: 81 x H/4 x W/4 x channels x width).
- a pretrained image encoder (``timm:<arch>``, ``open_clip:<arch>``,
  ``common.pretrained``): the size its weights were trained at (checked when the encoder is
  loaded); its tokens are its own (patch tokens, or the cells of its last feature map), and
  the fusion head trained here has no position embeddings of its own.

A pretrained image encoder goes with a pretrained text encoder (``hf:<name>`` or
``open_clip:<arch>``): the trained part is then the fusion head over their frozen features
(``common.pretrained.fusion_model``), and ``max_len`` counts the text encoder's own tokens
kept per caption. The pinned weight digests, the feature widths and each encoder's
preprocessing and tokenizer are part of the model config, so a checkpoint says which frozen
encoders it belongs to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedmm.common.pretrained.encoder_spec import (
    PRETRAINED_IMAGE_KINDS,
    PRETRAINED_TEXT_KINDS,
    pretrained_kind,
)

IMAGE_ENCODERS = ("patches", "conv", "scatter", "scatter-linear")
#: Encoders on the fixed scattering transform (common.scattering).
SCATTER_ENCODERS = ("scatter", "scatter-linear")
#: Hidden activations: GELU, or tanh, the "tempered sigmoid" that Papernot et al. (AAAI 2021)
#: found to train better under DP-SGD (bounded activations keep per-example gradients small,
#: so clipping discards less of them).
ACTIVATIONS = ("gelu", "tanh")
#: The built-in text encoder: hashed word ids (common.tokenizer) and trained blocks.
TEXT_ENCODERS = ("hashing",)
IMAGE_CHANNELS = (1, 3)
SCATTER_SCALES = 2  # J of the scattering transform (common.scattering)
SCATTER_STRIDE = 2**SCATTER_SCALES  # its grid is 2^J times coarser than the canvas
#: Canvas pixels per token side: the conv encoder halves the canvas three times; the scatter
#: encoder's convolution halves the scattering grid once.
CONV_STRIDE = 8
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 512
MAX_IMAGE_TOKENS = 256
MAX_CAPTION_WORDS = 64
#: Which encoders LoRA adapters go on (run config ``model-lora-encoders``).
LORA_ENCODERS = ("both", "image", "text")
MAX_LORA_RANK = 256
#: The built-in benchmark's canvas (common.data.benchmark): the default geometry.
BENCHMARK_IMAGE_SIZE = (28, 56)

_IMAGE_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"HEIGHTxWIDTH"`` (e.g. ``"64x64"``) to ``(height, width)``; a ValueError names the
    run-config key and the expected form."""
    match = _IMAGE_SIZE.fullmatch(str(text))
    if match is None:
        raise ValueError(
            f"run config 'image-size' = {text!r} is invalid: use HEIGHTxWIDTH in pixels, "
            f"e.g. '64x64' (the built-in benchmark is '28x56')"
        )
    return int(match.group(1)), int(match.group(2))


def format_image_size(height: int, width: int) -> str:
    """``(height, width)`` as the run config writes it, ``"HEIGHTxWIDTH"``."""
    return f"{height}x{width}"


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the model; the defaults train at useful speed on 2 CPU cores."""

    width: int = 32
    heads: int = 2
    patch_size: int = 7
    image_height: int = BENCHMARK_IMAGE_SIZE[0]
    image_width: int = BENCHMARK_IMAGE_SIZE[1]
    image_channels: int = 1  # 1: grayscale (N, H, W) images; 3: RGB (N, H, W, 3)
    image_layers: int = 1
    text_layers: int = 1
    mlp_ratio: int = 2
    vocab_buckets: int = 768  # hash buckets of the tokenizer (common.tokenizer)
    max_len: int = 12  # words per caption; longer captions are cut
    image_encoder: str = "patches"  # "patches" (linear patch embedding), "conv", "scatter", ...
    activation: str = "gelu"  # of the conv stem and the feed-forward layers: ACTIVATIONS
    text_encoder: str = "hashing"  # or a pretrained one, "hf:<name>" or "open_clip:<arch>"
    #: Pretrained encoders only: the pinned SHA-256 of each one's frozen weights, the width
    #: of its features, and its own preprocessing and tokenizer (JSON), filled in when the
    #: encoders are loaded (``common.pretrained.frozen_encoders.resolve_model_config``).
    image_weights_sha256: str = ""
    text_weights_sha256: str = ""
    image_feature_dim: int = 0
    text_feature_dim: int = 0
    image_preprocessing: str = ""
    text_tokenizer: str = ""
    #: Pretrained encoders only: LoRA adapters (``common.pretrained.lora_adapters``) on the
    #: last ``lora_blocks`` transformer blocks of the encoders ``lora_encoders`` names, of
    #: rank ``lora_rank`` scaled by ``lora_alpha / lora_rank``; 0 blocks: frozen encoders.
    #: ``lora_targets`` (JSON) names the adapted layers, filled in when the encoders load.
    lora_blocks: int = 0
    lora_encoders: str = "both"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = ""

    def __post_init__(self) -> None:
        image_kind = pretrained_kind(self.image_encoder)
        text_kind = pretrained_kind(self.text_encoder)
        if self.image_encoder not in IMAGE_ENCODERS and image_kind not in PRETRAINED_IMAGE_KINDS:
            raise ValueError(
                f"image_encoder must be one of {IMAGE_ENCODERS} or a pretrained one "
                f"('timm:<arch>', 'open_clip:<arch>'), got {self.image_encoder!r}"
            )
        if self.text_encoder not in TEXT_ENCODERS and text_kind not in PRETRAINED_TEXT_KINDS:
            raise ValueError(
                f"text_encoder must be one of {TEXT_ENCODERS} or a pretrained one "
                f"('hf:<name>', 'open_clip:<arch>'), got {self.text_encoder!r}"
            )
        if (image_kind is None) != (text_kind is None):
            raise ValueError(
                f"model-image-encoder = {self.image_encoder!r} and model-text-encoder = "
                f"{self.text_encoder!r}: a pretrained encoder needs a pretrained partner; "
                "name both (e.g. 'timm:vit_small_patch16_224' with 'hf:<name>', or "
                "'open_clip:<arch>' on both) or neither"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        problem = (
            self.image_geometry_problem() or self.text_geometry_problem() or self.lora_problem()
        )
        if problem:
            raise ValueError(problem)

    def image_geometry_problem(self) -> str | None:
        """Why this image geometry cannot be used (naming the run-config keys and the fix),
        or None."""
        h, w, c = self.image_height, self.image_width, self.image_channels
        size = f"image size {format_image_size(h, w)} (run config 'image-size')"
        if c not in IMAGE_CHANNELS:
            return (
                f"image channels {c!r} (run config 'image-channels') is invalid: use 1 for "
                "grayscale or 3 for colour (RGB)"
            )
        if not all(isinstance(s, int) and MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE for s in (h, w)):
            return f"{size} is invalid: each side must be in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]"
        if self.pretrained:
            return None  # the encoder's own input size, checked when it is loaded
        if self.image_encoder == "patches":
            p = self.patch_size
            if p < 1 or h % p or w % p:
                fitting = [
                    d
                    for d in range(max(p, 2), 65)
                    if h % d == 0 and w % d == 0 and (h // d) * (w // d) <= MAX_IMAGE_TOKENS
                ]
                hint = f"e.g. {fitting[0]}" if fitting else "none up to 64 does"
                return (
                    f"{size} is not a multiple of the patch size {p} (run config "
                    f"'model-patch-size'): use a patch size that divides both sides ({hint}), "
                    f"or another image size"
                )
        elif self.image_encoder in SCATTER_ENCODERS and (h % SCATTER_STRIDE or w % SCATTER_STRIDE):
            return (
                f"{size} does not suit the scatter encoder: both sides must be multiples of "
                f"{SCATTER_STRIDE} (the scattering grid), e.g. "
                f"{format_image_size(_round_to(h, SCATTER_STRIDE), _round_to(w, SCATTER_STRIDE))}"
            )
        if self.num_image_tokens > MAX_IMAGE_TOKENS:
            return (
                f"{size} gives {self.num_image_tokens} image tokens with the "
                f"{self.image_encoder!r} encoder, above {MAX_IMAGE_TOKENS} (self-attention "
                "grows with the square of the token count): use a smaller image size"
                + (" or a larger model-patch-size" if self.image_encoder == "patches" else "")
            )
        return None

    def text_geometry_problem(self) -> str | None:
        """Why this text geometry cannot be used, or None."""
        if not 2 <= self.vocab_buckets <= 2**20:
            return (
                f"vocabulary buckets {self.vocab_buckets} (run config 'model-vocab-buckets') "
                f"is invalid: use an integer in [2, {2**20}]"
            )
        if not 1 <= self.max_len <= MAX_CAPTION_WORDS:
            return (
                f"caption length {self.max_len} words (run config 'model-caption-words') is "
                f"invalid: use an integer in [1, {MAX_CAPTION_WORDS}]"
            )
        return None

    def lora_problem(self) -> str | None:
        """Why these LoRA settings cannot be used (naming the run-config key and the fix),
        or None; the block count is checked against the encoders when they are loaded."""
        blocks = self.lora_blocks
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            return (
                f"run config 'model-lora-blocks' = {blocks!r} is invalid: use an integer >= 0 "
                "(0: frozen encoders; N: LoRA adapters on each encoder's last N blocks)"
            )
        if self.lora_encoders not in LORA_ENCODERS:
            return (
                f"run config 'model-lora-encoders' = {self.lora_encoders!r} is invalid: use "
                f"one of {LORA_ENCODERS}"
            )
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int):
            return f"run config 'model-lora-rank' = {self.lora_rank!r} is invalid: use an integer"
        if not 1 <= self.lora_rank <= MAX_LORA_RANK:
            return (
                f"run config 'model-lora-rank' = {self.lora_rank} is invalid: use an integer "
                f"in [1, {MAX_LORA_RANK}] (4 to 16 is usual)"
            )
        if not (math.isfinite(float(self.lora_alpha)) and float(self.lora_alpha) > 0):
            return (
                f"run config 'model-lora-alpha' = {self.lora_alpha!r} is invalid: use a number "
                "> 0 (the adapters' output is scaled by alpha / rank; 2 x rank is usual)"
            )
        if blocks and not self.pretrained:
            return (
                f"run config 'model-lora-blocks' = {blocks} needs pretrained encoders: name "
                "them in model-image-encoder and model-text-encoder, or set "
                "model-lora-blocks = 0 (the built-in model trains every weight already)"
            )
        return None

    @property
    def image_lora_blocks(self) -> int:
        """Adapted blocks of the image encoder (0: frozen)."""
        return self.lora_blocks if self.lora_encoders in ("both", "image") else 0

    @property
    def text_lora_blocks(self) -> int:
        """Adapted blocks of the text encoder (0: frozen)."""
        return self.lora_blocks if self.lora_encoders in ("both", "text") else 0

    @property
    def pretrained(self) -> bool:
        """Frozen pretrained encoders with a trained fusion head (module docstring)."""
        return pretrained_kind(self.image_encoder) is not None

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the images the model takes."""
        return self.image_height, self.image_width

    @property
    def record_image_shape(self) -> tuple[int, ...]:
        """The shape of one record's image: ``(H, W)`` for grayscale, ``(H, W, C)`` else."""
        if self.image_channels == 1:
            return self.image_size
        return (*self.image_size, self.image_channels)

    @property
    def num_patches(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the text attends to: one per patch, or one per output cell of the
        conv or scatter encoder's last convolution, or the scatter-linear encoder's one."""
        if self.image_encoder == "scatter-linear":
            return 1
        if self.image_encoder in ("conv", "scatter"):
            rows = math.ceil(self.image_height / CONV_STRIDE)
            return rows * math.ceil(self.image_width / CONV_STRIDE)
        return self.num_patches

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """The config saved by :meth:`to_dict` (``model-config.json``); keys a file from an
        older release lacks take their defaults (images were 28x56 grayscale then)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"model config has unknown key(s) {unknown}: it was written by another "
                f"release of fedmm; known keys: {sorted(known)}"
            )
        return cls(**dict(values))


def model_config_from_settings(source: Any) -> ModelConfig:
    """The model a run's ``model-*`` and ``image-*`` settings name, from any object with
    those fields (``FederationConfig``, ``TrainRequest``); a ValueError names the key."""
    height, width = parse_image_size(source.image_size)
    text_encoder = getattr(source, "model_text_encoder", "hashing")
    image_sha256 = getattr(source, "model_image_weights_sha256", "")
    text_sha256 = getattr(source, "model_text_weights_sha256", "")
    if not text_sha256 and text_encoder == source.model_image_encoder:
        text_sha256 = image_sha256  # one OpenCLIP checkpoint for both
    return ModelConfig(
        width=source.model_width,
        heads=source.model_heads,
        patch_size=source.model_patch_size,
        image_height=height,
        image_width=width,
        image_channels=source.image_channels,
        image_layers=source.model_image_layers,
        text_layers=source.model_text_layers,
        vocab_buckets=source.model_vocab_buckets,
        max_len=source.model_caption_words,
        image_encoder=source.model_image_encoder,
        activation=source.model_activation,
        text_encoder=text_encoder,
        image_weights_sha256=image_sha256,
        text_weights_sha256=text_sha256,
        lora_blocks=getattr(source, "model_lora_blocks", 0),
        lora_encoders=getattr(source, "model_lora_encoders", "both"),
        lora_rank=getattr(source, "model_lora_rank", 8),
        lora_alpha=float(getattr(source, "model_lora_alpha", 16.0)),
    )


def _round_to(value: int, step: int) -> int:
    return max(step, round(value / step) * step)
