"""A decoded image as the model's pixels: grayscale or RGB, 8 bits, letterboxed.

Every Pillow mode a supported file can decode to is turned into 8-bit ``L`` (one channel) or
``RGB`` (three) without clipping or dropping information silently; each step that changes
what the picture looks like is named by a :class:`PixelConversion`, which the loader counts:

- Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or grayscale
  or RGB images with a transparent colour) is composited over an opaque white background,
  ``TRANSPARENCY_BACKGROUND``: dropping alpha instead would show whatever colour the
  transparent pixels happen to store (often black, which turns black line art on a
  transparent background into a black square). White, because drawings, icons and scans are
  made to be seen on paper or a light page.
- 16-bit grayscale (``I;16*``, and ``I``, which Pillow uses for 16-bit data of some formats) is
  scaled by 255/65535 rather than clipped at 255. 16-bit RGB PNGs are decoded by Pillow to
  8 bits per channel already.
- CMYK (print JPEG and TIFF) and other colour spaces (``YCbCr``, ``LAB``, ``HSV``) are
  converted to RGB by Pillow's conversion (no ICC colour management).
- Colour to grayscale uses ITU-R 601-2 luma (Pillow's ``L`` conversion); grayscale to RGB
  repeats the gray value in the three channels.

Letterboxing scales the image to fit inside ``(height, width)`` with its aspect ratio kept
(Lanczos resampling) and pads the two short sides with black, ``LETTERBOX_FILL``, as the
built-in benchmark's black background.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from PIL import Image, ImageOps

TRANSPARENCY_BACKGROUND = 255  # white, in every channel
LETTERBOX_FILL = 0  # black, in every channel

_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_OTHER_COLOUR_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})
_GRAY_MODES = frozenset({"1", "L", "I", "F"}) | _SIXTEEN_BIT_GRAY_MODES


class PixelConversion(StrEnum):
    """A change to what an image looks like on its way to the model's pixels."""

    TRANSPARENCY_COMPOSITED = "transparency_composited"  # some pixel was not opaque
    SIXTEEN_BIT_SCALED = "sixteen_bit_scaled"  # 16-bit samples scaled to 8 bits
    COLOUR_SPACE_CONVERTED = "colour_space_converted"  # CMYK, YCbCr, LAB or HSV to RGB
    COLOUR_TO_GRAY = "colour_to_gray"  # a colour image for a grayscale model
    GRAY_TO_RGB = "gray_to_rgb"  # a grayscale image for a colour model


def to_model_pixels(
    image: Image.Image, *, image_size: tuple[int, int], channels: int
) -> tuple[np.ndarray, list[PixelConversion]]:
    """``image`` (upright already) as ``uint8`` ``(H, W)`` for ``channels`` 1 or
    ``(H, W, 3)`` for 3, letterboxed to ``image_size``; and the conversions it took."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    converted, steps = to_channels(image, channels)
    height, width = image_size
    fill = LETTERBOX_FILL if channels == 1 else (LETTERBOX_FILL,) * 3
    boxed = ImageOps.pad(converted, (width, height), method=Image.Resampling.LANCZOS, color=fill)
    return np.asarray(boxed, dtype=np.uint8), steps


def to_channels(image: Image.Image, channels: int) -> tuple[Image.Image, list[PixelConversion]]:
    """``image`` in mode ``L`` (``channels`` 1) or ``RGB`` (3), and the conversions."""
    steps: list[PixelConversion] = []
    was_gray = image.mode in _GRAY_MODES or image.mode in ("LA", "La")
    if image.mode == "P":
        was_gray = _palette_is_gray(image)
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        image = _sixteen_bit_to_eight(image)
        steps.append(PixelConversion.SIXTEEN_BIT_SCALED)
    elif has_transparency(image):
        image, composited = flatten_transparency(image)
        if composited:
            steps.append(PixelConversion.TRANSPARENCY_COMPOSITED)
    elif image.mode in _OTHER_COLOUR_MODES:
        image = image.convert("RGB")
        steps.append(PixelConversion.COLOUR_SPACE_CONVERTED)
    target = "L" if channels == 1 else "RGB"
    if channels == 1 and not was_gray:
        steps.append(PixelConversion.COLOUR_TO_GRAY)
    elif channels == 3 and was_gray:
        steps.append(PixelConversion.GRAY_TO_RGB)
    return (image if image.mode == target else image.convert(target)), steps


def _palette_is_gray(image: Image.Image) -> bool:
    palette = image.getpalette("RGB") or []
    triples = zip(palette[0::3], palette[1::3], palette[2::3], strict=True)
    return all(r == g == b for r, g, b in triples)


def has_transparency(image: Image.Image) -> bool:
    """Whether ``image`` has an alpha channel or a transparent colour (it may still be
    fully opaque)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def flatten_transparency(image: Image.Image) -> tuple[Image.Image, bool]:
    """``image`` over an opaque white background, as RGB; and whether any pixel was not
    fully opaque (so the composite changed something). Anything that writes images for the
    model (a de-identified copy, say) should flatten this way rather than drop alpha."""
    rgba = image.convert("RGBA")
    alpha_min, _ = rgba.getchannel("A").getextrema()
    background = Image.new("RGBA", rgba.size, (TRANSPARENCY_BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB"), alpha_min < 255


def _sixteen_bit_to_eight(image: Image.Image) -> Image.Image:
    """16-bit grayscale to ``L``, 0..65535 onto 0..255 (values outside are clipped)."""
    samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray((samples // 257).astype(np.uint8))  # 2-D uint8: mode L
