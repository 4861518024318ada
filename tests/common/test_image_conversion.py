"""Images reach the model as the site has them: colour or grayscale, transparency
composited, 16-bit and CMYK handled, every conversion counted."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.common.data.image_conversion import (
    TRANSPARENCY_BACKGROUND,
    PixelConversion,
    to_channels,
)
from fedmm.common.data.imagefolder import METADATA_FILE, load_imagefolder

OPENCLIPART_PNG = Path("/usr/share/openclipart/png")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def sixteen_bit_rgb_png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    """A ``size`` x ``size`` PNG of 16 bits per channel (colour type 2), one colour."""
    header = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    row = b"\x00" + struct.pack(">HHH", *rgb) * size  # filter byte 0, then the pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(row * size))
        + png_chunk(b"IEND", b"")
    )


def folder_of(root: Path, images: dict[str, Image.Image | bytes]) -> Path:
    """An imagefolder with one record per image, captioned with its file name."""
    lines = []
    for name, image in images.items():
        if isinstance(image, bytes):
            (root / name).write_bytes(image)
        else:
            image.save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"picture {name}"}))
    (root / METADATA_FILE).write_text("\n".join(lines) + "\n")
    return root


def test_colour_is_kept_at_three_channels(tmp_path: Path) -> None:
    folder_of(tmp_path, {"red.png": Image.new("RGB", (20, 20), (250, 10, 30))})
    data, report = load_imagefolder(tmp_path, image_size=(16, 16), channels=3)

    assert data.images.shape == (1, 16, 16, 3)
    assert data.image_channels == 3
    assert np.abs(data.images[0].astype(int) - [250, 10, 30]).max() <= 1
    assert report.conversions == {}


def test_grayscale_for_a_colour_model_repeats_the_gray_and_is_counted(tmp_path: Path) -> None:
    folder_of(tmp_path, {"gray.png": Image.new("L", (12, 12), 90)})
    data, report = load_imagefolder(tmp_path, image_size=(12, 12), channels=3)

    assert np.all(data.images[0] == 90)
    assert report.conversions == {"gray_to_rgb": 1}


def test_colour_for_a_grayscale_model_is_counted(tmp_path: Path) -> None:
    folder_of(tmp_path, {"red.png": Image.new("RGB", (12, 12), (255, 0, 0))})
    data, report = load_imagefolder(tmp_path, image_size=(12, 12), channels=1)

    assert data.images.shape == (1, 12, 12)
    assert np.all(np.abs(data.images[0].astype(int) - 76) <= 1)  # ITU-R 601 luma of red
    assert report.conversions == {"colour_to_gray": 1}


def test_letterbox_bars_are_black_in_colour(tmp_path: Path) -> None:
    folder_of(tmp_path, {"wide.png": Image.new("RGB", (40, 20), (0, 200, 0))})
    data, _ = load_imagefolder(tmp_path, image_size=(28, 28), channels=3)
    image = data.images[0]

    assert np.all(image[:6] == 0) and np.all(image[-6:] == 0)
    assert np.all(np.abs(image[8:20].astype(int) - [0, 200, 0]) <= 2)


@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_pixels_are_composited_on_white(tmp_path: Path, channels: int) -> None:
    """Black line art on a transparent background stays visible: the transparent half is
    white, not the black its pixels store."""
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)  # black everywhere
    pixels[:, :8, 3] = 255  # left half opaque black, right half fully transparent
    folder_of(tmp_path, {"line_art.png": Image.fromarray(pixels)})
    data, report = load_imagefolder(tmp_path, image_size=(16, 16), channels=channels)
    image = data.images[0]

    assert np.all(image[:, :7] <= 2)
    assert np.all(image[:, 9:] >= TRANSPARENCY_BACKGROUND - 2)
    assert report.conversions["transparency_composited"] == 1


def test_half_transparent_colour_blends_with_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgb, steps = to_channels(rgba, 3)

    assert steps == [PixelConversion.TRANSPARENCY_COMPOSITED]
    assert np.abs(np.asarray(rgb).astype(int)[0, 0] - [255, 127, 127]).max() <= 1


def test_palette_image_with_a_transparent_index_is_composited(tmp_path: Path) -> None:
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 5, 10))  # left half: index 0, black but transparent
    palette.save(tmp_path / "pal.png", transparency=0)
    folder_of(tmp_path, {"pal.png": (tmp_path / "pal.png").read_bytes()})
    data, report = load_imagefolder(tmp_path, image_size=(10, 10), channels=3)

    assert np.all(data.images[0][:, :4] >= 253)  # white, not black
    assert np.all(np.abs(data.images[0][:, 6:].astype(int) - [0, 0, 255]) <= 2)
    assert report.conversions == {"transparency_composited": 1}


def test_an_opaque_alpha_channel_changes_nothing_and_is_not_counted() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgb, steps = to_channels(rgba, 3)

    assert steps == []
    assert np.asarray(rgb)[0, 0].tolist() == [10, 20, 30]


def test_sixteen_bit_rgb_keeps_its_colour(tmp_path: Path) -> None:
    folder_of(tmp_path, {"deep.png": sixteen_bit_rgb_png((40_000, 20_000, 60_000))})
    data, report = load_imagefolder(tmp_path, image_size=(8, 8), channels=3)

    assert report.loaded == 1
    expected = np.array([40_000, 20_000, 60_000]) / 257
    assert np.abs(data.images[0].astype(float) - expected).max() <= 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_grayscale_tiff_is_scaled_not_clipped(tmp_path: Path, channels: int) -> None:
    Image.fromarray(np.full((8, 8), 51_400, dtype=np.uint16)).save(tmp_path / "scan.tif")
    folder_of(tmp_path, {"scan.tif": (tmp_path / "scan.tif").read_bytes()})
    data, report = load_imagefolder(tmp_path, image_size=(8, 8), channels=channels)

    assert np.all(data.images[0] == 200)
    assert report.conversions["sixteen_bit_scaled"] == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_cmyk_jpeg_becomes_rgb(tmp_path: Path, channels: int) -> None:
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)
    folder_of(tmp_path, {"print.jpg": (tmp_path / "print.jpg").read_bytes()})
    data, report = load_imagefolder(tmp_path, image_size=(12, 12), channels=channels)

    expected = [255, 0, 0] if channels == 3 else 76  # red, or its luma
    assert np.abs(data.images[0].astype(int) - expected).max() <= 4
    assert report.conversions["colour_space_converted"] == 1


@pytest.mark.skipif(not OPENCLIPART_PNG.is_dir(), reason="needs Debian's openclipart-png")
def test_real_clipart_of_every_mode_loads_in_colour(tmp_path: Path) -> None:
    """OpenClipart's RGBA, palette, gray-with-alpha, RGB and gray PNGs, as shipped."""
    wanted = ("RGBA", "P", "LA", "RGB", "L")
    found: dict[str, Path] = {}
    for path in sorted(OPENCLIPART_PNG.glob("*/*.png")):
        if path.is_symlink() or path.stat().st_size > 200_000:
            continue
        with Image.open(path) as image:
            if image.mode in wanted and image.mode not in found:
                found[image.mode] = path
        if len(found) == len(wanted):
            break
    assert set(found) == set(wanted)
    folder_of(tmp_path, {f"{mode}.png": path.read_bytes() for mode, path in found.items()})
    data, report = load_imagefolder(tmp_path, image_size=(64, 64), channels=3, caption_words=1)

    assert report.loaded == len(wanted) and report.total_skipped == 0
    assert data.images.shape == (len(wanted), 64, 64, 3)
    assert report.conversions.get("transparency_composited", 0) >= 2  # RGBA and LA at least
    assert report.captions_truncated == len(wanted)  # "picture X.png" is 3 words
    for image in data.images:  # a picture, not a flat square
        assert image.std() > 5
