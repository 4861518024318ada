"""A cross-attention image-text matching model that Opacus can train by construction.

Image: ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB, of the size and channels the config
names (anything else is refused with an error naming both shapes). The image is cut into
patches and embedded linearly (``image_encoder = "patches"``, the default, cheap enough for
DP-SGD on 2 cores; on the built-in 28x56 canvas 7x7 patches), or passed through a small
convolutional stem whose output cells (each computed from a 17x17-pixel window, 8 pixels
apart) become the tokens (``"conv"``: about 3x the compute, better features; GroupNorm, so
Opacus computes per-sample gradients for it), or taken from fixed scattering features
(``common.scattering``, 81 channels per image channel on a grid 4 times coarser than the
image) by one trained stride-2 convolution (``"scatter"``: Tramer and Boneh's ScatterNet
front for DP-SGD, ICLR 2021; the best features under DP here, and about half the conv
encoder's DP-SGD cost because the fixed transform is computed once per record), or mapped
linearly, all of them at once, to a single token (``"scatter-linear"``: their "ScatterNet +
linear" model, the best of their Fashion-MNIST results at epsilon 3). Tokens get
learned position embeddings and are refined by pre-norm transformer blocks. Text: hashed word
ids (``common.tokenizer``) with position embeddings and transformer blocks per caption.
Cross-attention: every text token queries the image patches; a token's score is its readout
vector dotted with the values it attended to, and a caption's score is the mean over its
tokens. The hidden activations of the conv stem and the feed-forward layers are GELU, or tanh
(``activation = "tanh"``: the tempered sigmoid of Papernot, Thakurta, Song, Chien, Erlingsson,
"Tempered Sigmoid Activations for Deep Learning with Differential Privacy", AAAI 2021).

The image blocks, the text blocks and the cross-attention use ``MultiHeadAttention``
below, built from ``nn.Linear`` only (so Opacus computes per-sample gradients for it like
any linear layer). Opacus 1.6's ``DPMultiheadAttention`` is not used: with
``batch_first=True`` it reshapes its output ``(B*heads, L, d)`` straight to ``(B, L, E)``,
splicing heads into positions (wrong output whenever heads > 1; meta-pytorch/opacus PR
#825), it fails on the empty batches Poisson sampling draws, and it rejects every attention
mask (it compares the mask to the batch size); retrieval must also score all image-caption
pairs without recomputing projections. There is no BatchNorm; norms are LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmm.common.model_config import (
    ACTIVATIONS,
    SCATTER_ENCODERS,
    SCATTER_STRIDE,
    ModelConfig,
)
from fedmm.common.scattering import CHANNELS as SCATTER_CHANNELS
from fedmm.common.scattering import scattering_features
from fedmm.common.tokenizer import PAD_ID

#: GroupNorm groups over the scattering channels (81 per image channel), as Tramer and Boneh
#: normalise them (27 groups, also for their 243 channels of CIFAR-10 colour images).
SCATTER_GROUPS = 27


class ImageShapeError(ValueError):
    """Images whose shape is not the one the model was configured (and trained) for."""


def check_image_batch(shape: tuple[int, ...], config: ModelConfig) -> None:
    """Raise :class:`ImageShapeError` unless ``shape`` is ``(N, *config.record_image_shape)``."""
    expected = config.record_image_shape
    if len(shape) == 1 + len(expected) and tuple(shape[1:]) == expected:
        return
    kind = "grayscale (N, H, W)" if config.image_channels == 1 else "RGB (N, H, W, 3)"
    raise ImageShapeError(
        f"images of shape {tuple(shape)} do not fit this model, which takes {kind} images "
        f"of {config.image_height}x{config.image_width} (model config image_height, "
        f"image_width, image_channels): load the data with image-size = "
        f"'{config.image_height}x{config.image_width}' and image-channels = "
        f"{config.image_channels}"
    )


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention over the last-but-one axis, any leading axes."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # (..., L, h, dh)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        logits = torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
        if key_padding is not None:
            logits = logits.masked_fill(key_padding[..., None, None, :], float("-inf"))
        attended = torch.einsum("...hqk,...khd->...qhd", logits.softmax(-1), v)
        return self.out(attended.flatten(-2))


def activation_layer(name: str) -> nn.Module:
    """The hidden activation ``name`` (``ModelConfig.activation``); it has no parameters, so
    checkpoints of either choice load into the other."""
    layers: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "tanh": nn.Tanh}
    if name not in layers:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return layers[name]()


class FeedForward(nn.Module):
    def __init__(self, width: int, ratio: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(width, ratio * width)
        self.act = activation_layer(activation)
        self.down = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class ImageBlock(nn.Module):
    """Pre-norm transformer block over image patches."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), None)
        return x + self.mlp(self.norm2(x))


class TextBlock(nn.Module):
    """Pre-norm transformer block over the tokens of each caption."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio, activation)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding)
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Module):
    """Images ``(N, C, H, W)`` to tokens ``(N, ceil(H/8) * ceil(W/8), width)``: a 3x3
    convolution at full resolution, then three stride-2 ones, each with GroupNorm and the
    model's activation."""

    def __init__(self, width: int, activation: str, in_channels: int = 1) -> None:
        super().__init__()
        channels = (in_channels, 16, 32, width, width)
        strides = (1, 2, 2, 2)  # overall CONV_STRIDE
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(_groups(c_out), c_out),
                activation_layer(activation),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(2).transpose(1, 2)


class ScatterStem(nn.Module):
    """Images ``(N, C, H, W)`` in [0, 1] to tokens ``(N, ceil(H/8) * ceil(W/8), width)``: the
    fixed scattering features (``common.scattering``: 81 channels per image channel on a grid
    4 times coarser than the image), GroupNorm with 27 groups (Tramer and Boneh's
    data-independent normalisation), then one stride-2 3x3 convolution with GroupNorm and the
    model's activation (their "CNN on ScatterNet" front), whose cells are the tokens."""

    def __init__(self, width: int, activation: str, in_channels: int = 1) -> None:
        super().__init__()
        features = SCATTER_CHANNELS * in_channels
        self.layers = nn.Sequential(
            nn.GroupNorm(SCATTER_GROUPS, features),
            nn.Conv2d(features, width, 3, stride=2, padding=1),
            nn.GroupNorm(_groups(width), width),
            activation_layer(activation),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(scattering_features(x).to(x.device)).flatten(2).transpose(1, 2)


class ScatterLinearStem(nn.Module):
    """Images ``(N, C, H, W)`` in [0, 1] to one token ``(N, 1, width)``: the fixed scattering
    features, GroupNorm with 27 groups and no trained scale or shift (Tramer and Boneh's
    "ScatterNet + linear": every feature of the image, each position its own weight), then
    one linear map of all of them. The trained part is a linear model of the normalised
    features, so DP-SGD's per-example gradients of it are outer products
    (``client.per_example_gradients`` never materialises them)."""

    def __init__(self, width: int, in_channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        features = SCATTER_CHANNELS * in_channels
        self.norm = nn.GroupNorm(SCATTER_GROUPS, features, affine=False)
        self.linear = nn.Linear(features * grid[0] * grid[1], width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.norm(scattering_features(x).to(x.device))
        return self.linear(features.flatten(1))[:, None]


def unit_images(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A batch as the model stores it (``uint8`` or float in [0, 255], ``(N, H, W)`` grey or
    ``(N, H, W, 3)`` RGB; :class:`ImageShapeError` otherwise) to ``(N, C, H, W)`` in [0, 1],
    what the image encoders (and the scattering memo's keys) take."""
    check_image_batch(tuple(images.shape), config)
    x = images.float() / 255.0
    # contiguous: a channels-last tensor makes the convolutions' outputs channels-last too,
    # and Opacus 1.6's per-sample gradients of Conv2d are then wrong
    # (tests/common/test_per_example_gradient.py, conv-rgb)
    return x[:, None] if config.image_channels == 1 else x.permute(0, 3, 1, 2).contiguous()


def _groups(channels: int) -> int:
    """4 GroupNorm groups where they divide the channels, else as many as do."""
    return math.gcd(channels, 4)


def check_token_batch(tokens: torch.Tensor, config: ModelConfig) -> None:
    """Raise a ValueError unless ``tokens`` fit the model's text geometry."""
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
    if tokens.shape[-1] > config.max_len or low < 0 or high >= config.vocab_buckets:
        raise ValueError(
            f"caption tokens of shape {tuple(tokens.shape)} with ids in [{low}, {high}] do "
            "not fit this model "
            f"({config.max_len} words, {config.vocab_buckets} buckets): tokenize with "
            "HashingTokenizer.for_model(model.config)"
        )


@dataclass
class ImageStates:
    """Keys and values of image patches, ``(N, P, heads, head_dim)`` each."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class TextStates:
    """Queries and readouts of caption tokens, ``(..., T, heads, head_dim)``, and the mask."""

    queries: torch.Tensor
    readouts: torch.Tensor
    valid: torch.Tensor  # (..., T) bool


def score_candidates(images: ImageStates, texts: TextStates) -> torch.Tensor:
    """Scores ``(B, C)`` of each image against its own ``C`` candidate captions: every caption
    token queries the image tokens (the cross-attention), its score is its readout dotted
    with the values it attended to, a caption's score is the mean over its valid tokens."""
    scale = 1.0 / math.sqrt(images.keys.shape[-1])
    logits = torch.einsum("bcthd,bphd->bcthp", texts.queries, images.keys) * scale
    matches = torch.einsum("bcthd,bphd->bcthp", texts.readouts, images.values) * scale
    per_token = (logits.softmax(-1) * matches).sum((-1, -2)) * texts.valid  # (B, C, T)
    return per_token.sum(-1) / texts.valid.sum(-1)


def score_all_pairs(images: ImageStates, texts: TextStates, chunk: int = 25) -> torch.Tensor:
    """Scores ``(N_images, N_texts)`` of every image against every caption.

    Same maths as :func:`score_candidates`; only valid (non-padding) tokens are computed,
    as batched matrix products per head, ``chunk`` images at a time.
    """
    heads, head_dim = images.keys.shape[-2:]
    scale = 1.0 / math.sqrt(head_dim)
    caption_of_token = torch.nonzero(texts.valid)[:, 0]  # (V,)
    num_texts = texts.valid.shape[0]
    tokens_per_text = texts.valid.sum(-1).to(images.keys.dtype)
    queries = texts.queries[texts.valid].transpose(0, 1) * scale  # (h, V, dh)
    readouts = texts.readouts[texts.valid].transpose(0, 1) * scale
    rows = []
    for start in range(0, images.keys.shape[0], chunk):
        keys = images.keys[start : start + chunk]  # (I, P, h, dh)
        n, p = keys.shape[:2]
        keys = keys.permute(2, 3, 0, 1).reshape(heads, head_dim, n * p)
        values = images.values[start : start + chunk].permute(2, 3, 0, 1)
        values = values.reshape(heads, head_dim, n * p)
        weights = torch.bmm(queries, keys).view(heads, -1, n, p).softmax(-1)
        matches = torch.bmm(readouts, values).view(heads, -1, n, p)
        per_token = (weights * matches).sum((0, 3)).T  # (I, V)
        per_text = per_token.new_zeros(n, num_texts)
        per_text.index_add_(1, caption_of_token, per_token)
        rows.append(per_text / tokens_per_text)
    return torch.cat(rows)


class CrossAttentionMatcher(nn.Module):
    """Scores how well a caption describes an image (higher is better)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        w, channels = config.width, config.image_channels
        if config.image_encoder == "conv":
            self.conv_stem = ConvStem(w, config.activation, channels)
        elif config.image_encoder == "scatter":
            self.scatter_stem = ScatterStem(w, config.activation, channels)
        elif config.image_encoder == "scatter-linear":
            grid = (config.image_height // SCATTER_STRIDE, config.image_width // SCATTER_STRIDE)
            self.scatter_stem = ScatterLinearStem(w, channels, grid)
        else:
            self.patch_embed = nn.Linear(channels * config.patch_size**2, w)
        self.patch_position = nn.Embedding(config.num_image_tokens, w)
        self.image_blocks = nn.ModuleList(
            ImageBlock(w, config.heads, config.mlp_ratio, config.activation)
            for _ in range(config.image_layers)
        )
        self.image_norm = nn.LayerNorm(w)
        self.token_embed = nn.Embedding(config.vocab_buckets, w)
        self.token_position = nn.Embedding(config.max_len, w)
        self.text_blocks = nn.ModuleList(
            TextBlock(w, config.heads, config.mlp_ratio, config.activation)
            for _ in range(config.text_layers)
        )
        self.text_norm = nn.LayerNorm(w)
        self.cross_query = nn.Linear(w, w)
        self.cross_readout = nn.Linear(w, w)
        self.cross_key = nn.Linear(w, w)
        self.cross_value = nn.Linear(w, w)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.config.heads, -1))

    def encode_images(self, images: torch.Tensor) -> ImageStates:
        """``images``: ``uint8`` or float in [0, 255], ``(N, H, W)`` grayscale or
        ``(N, H, W, 3)`` RGB, as the config says (:class:`ImageShapeError` otherwise)."""
        c, p = self.config, self.config.patch_size
        x = unit_images(images, c)
        if c.image_encoder in SCATTER_ENCODERS:
            x = self.scatter_stem(x)  # (N, tokens, w)
        elif c.image_encoder == "conv":
            x = self.conv_stem(x - 0.5)  # (N, tokens, w)
        else:
            x = (x - 0.5).unfold(2, p, p).unfold(3, p, p)  # (N, C, H/p, W/p, p, p)
            x = x.permute(0, 2, 3, 1, 4, 5)  # (N, H/p, W/p, C, p, p)
            x = self.patch_embed(x.reshape(len(images), c.num_patches, c.image_channels * p * p))
        positions = torch.arange(c.num_image_tokens).expand(len(images), -1).contiguous()
        x = x + self.patch_position(positions)
        for block in self.image_blocks:
            x = block(x)
        x = self.image_norm(x)
        return ImageStates(self._heads(self.cross_key(x)), self._heads(self.cross_value(x)))

    def encode_texts(self, tokens: torch.Tensor) -> TextStates:
        """``tokens``: ``int64 (..., T)`` from ``HashingTokenizer``."""
        tokens = tokens.contiguous()
        check_token_batch(tokens, self.config)
        valid = tokens != PAD_ID
        valid[..., 0] = True  # an empty caption still has one position to attend from
        positions = torch.arange(tokens.shape[-1]).expand_as(tokens).contiguous()
        x = self.token_embed(tokens) + self.token_position(positions)
        for block in self.text_blocks:
            x = block(x, ~valid)
        x = self.text_norm(x)
        return TextStates(
            self._heads(self.cross_query(x)), self._heads(self.cross_readout(x)), valid
        )

    def score_candidates(self, images: ImageStates, texts: TextStates) -> torch.Tensor:
        """Scores ``(B, C)`` of each image against its own ``C`` candidate captions."""
        return score_candidates(images, texts)

    def score_all_pairs(
        self, images: ImageStates, texts: TextStates, chunk: int = 25
    ) -> torch.Tensor:
        """Scores ``(N_images, N_texts)`` of every image against every caption."""
        return score_all_pairs(images, texts, chunk)

    def forward(self, images: torch.Tensor, candidate_tokens: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, C)`` for images ``(B, H, W[, 3])`` and tokens ``(B, C, T)``."""
        return self.score_candidates(
            self.encode_images(images), self.encode_texts(candidate_tokens)
        )
