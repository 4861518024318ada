"""The model takes the image size and channels its config names, and nothing else."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedmm.common.model import CrossAttentionMatcher, ImageShapeError
from fedmm.common.model_config import ModelConfig, parse_image_size
from fedmm.common.tokenizer import HashingTokenizer

SMALL = ModelConfig(width=16, heads=2)


@pytest.mark.parametrize(
    ("encoder", "height", "width", "patch", "tokens"),
    [
        ("patches", 32, 32, 8, 16),
        ("patches", 64, 64, 8, 64),
        ("patches", 128, 128, 16, 64),
        ("conv", 32, 32, 7, 16),
        ("conv", 40, 24, 7, 15),  # ceil(40/8) * ceil(24/8)
        ("conv", 128, 128, 7, 256),
        ("scatter", 32, 32, 7, 16),
        ("scatter", 44, 24, 7, 18),  # ceil(44/8) * ceil(24/8)
        ("scatter", 128, 128, 7, 256),
        ("scatter-linear", 32, 32, 7, 1),
        ("scatter-linear", 44, 24, 7, 1),
    ],
)
def test_every_encoder_scores_colour_images_of_its_size(
    encoder: str, height: int, width: int, patch: int, tokens: int
) -> None:
    config = replace(
        SMALL,
        image_encoder=encoder,
        image_height=height,
        image_width=width,
        image_channels=3,
        patch_size=patch,
    )
    model = CrossAttentionMatcher(config)
    images = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8)
    assert config.num_image_tokens == tokens
    assert model.encode_images(images).keys.shape == (2, tokens, 2, 8)
    assert model(images, torch.ones(2, 3, 12, dtype=torch.long)).shape == (2, 3)
    assert model(images[:0], torch.ones(0, 3, 12, dtype=torch.long)).shape == (0, 3)


@pytest.mark.parametrize("encoder", ["patches", "conv", "scatter", "scatter-linear"])
def test_a_colour_model_sees_colour(encoder: str) -> None:
    """Red and blue images of the same brightness are different inputs, not one gray."""
    torch.manual_seed(0)
    config = replace(
        SMALL,
        image_encoder=encoder,
        image_height=32,
        image_width=32,
        image_channels=3,
        patch_size=8,
    )
    model = CrossAttentionMatcher(config)
    red = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    red[..., 0] = 200
    blue = red.roll(2, dims=-1)
    assert not torch.allclose(model.encode_images(red).keys, model.encode_images(blue).keys)


def test_images_of_another_shape_are_refused_naming_both() -> None:
    colour = CrossAttentionMatcher(
        replace(SMALL, image_height=64, image_width=64, image_channels=3, patch_size=8)
    )
    with pytest.raises(ImageShapeError, match=r"\(2, 28, 56\).*RGB.*64x64.*image-size = '64x64'"):
        colour.encode_images(torch.zeros(2, 28, 56))
    with pytest.raises(ImageShapeError, match="image-channels = 3"):
        colour.encode_images(torch.zeros(2, 64, 64))
    gray = CrossAttentionMatcher(SMALL)
    with pytest.raises(ImageShapeError, match=r"grayscale.*28x56.*image-channels = 1"):
        gray.encode_images(torch.zeros(2, 28, 56, 3))
    with pytest.raises(ImageShapeError, match=r"\(2, 56, 28\)"):
        gray.encode_images(torch.zeros(2, 56, 28))


def test_tokens_from_another_tokenizer_are_refused() -> None:
    model = CrossAttentionMatcher(replace(SMALL, vocab_buckets=100, max_len=8))
    images = torch.zeros(1, 28, 56)
    fitting = HashingTokenizer.for_model(model.config).encode_batch(["a red apple"] * 2)
    assert model(images, torch.from_numpy(fitting)[None]).shape == (1, 2)
    too_long = torch.ones(1, 2, 12, dtype=torch.long)
    with pytest.raises(ValueError, match=r"HashingTokenizer\.for_model"):
        model(images, too_long)
    with pytest.raises(ValueError, match=r"ids in \[1, 700\]"):
        model(images, torch.tensor([[[1, 700]]]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_channels": 2}, r"image-channels.*1 for grayscale or 3"),
        ({"image_height": 4}, r"image-size.*\[8, 512\]"),
        ({"image_height": 64, "image_width": 64}, r"model-patch-size.*e\.g\. 8"),
        (
            {"image_encoder": "scatter", "image_height": 30, "image_width": 30},
            r"multiples of 4.*e\.g\. 32x32",
        ),
        (
            {"image_encoder": "scatter-linear", "image_height": 30, "image_width": 32},
            r"multiples of 4.*e\.g\. 32x32",
        ),
        (
            {"image_encoder": "conv", "image_height": 256, "image_width": 256},
            r"1024 image tokens.*above 256.*smaller image size",
        ),
        ({"vocab_buckets": 1}, "model-vocab-buckets"),
        ({"max_len": 0}, "model-caption-words"),
    ],
)
def test_unusable_geometry_is_refused_naming_the_run_config_key(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **changes)


def test_image_size_is_written_height_x_width() -> None:
    assert parse_image_size("64x48") == (64, 48)
    assert parse_image_size(" 28 X 56 ") == (28, 56)
    for bad in ("64", "64x", "64*64", "x64", "-1x8", "8x8x3"):
        with pytest.raises(ValueError, match=r"'image-size'.*HEIGHTxWIDTH.*'64x64'"):
            parse_image_size(bad)


def test_saved_model_config_round_trips_and_older_files_load_as_grayscale() -> None:
    config = replace(SMALL, image_height=64, image_width=64, image_channels=3, patch_size=8)
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["image_channels"] == 3 and saved["image_height"] == 64
    assert ModelConfig.from_dict(saved) == config
    older = {k: v for k, v in SMALL.to_dict().items() if k != "image_channels"}
    assert ModelConfig.from_dict(older).image_channels == 1
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour_space'\]"):
        ModelConfig.from_dict({**saved, "colour_space": "srgb"})
