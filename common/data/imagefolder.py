"""A user's own image-text records: a folder in the Hugging Face ``imagefolder`` convention.

Layout::

    root/
      metadata.jsonl        one JSON object per line
      0001.png              images, at any depth below root
      scans/0002.jpg

Each line of ``metadata.jsonl`` names one record::

    {"file_name": "0001.png", "text": "a sandal on the left", "label": "sandal"}

``file_name`` is relative to ``root``; ``text`` is the caption; ``label`` is optional and is
either a class index (int >= 0) or a class name. Class names map to indices through
``label_names`` when given; otherwise through the sorted distinct names found in the file,
and integer labels are then indices into that same list (the list is returned in the
report). With no names anywhere, integer labels are taken as they are. A record without a
label gets ``NO_LABEL``.

Images are decoded with Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM only: formats with
external interpreters, such as EPS, are never opened), turned upright by their EXIF
orientation, converted to 8-bit grayscale (``channels = 1``, the default) or RGB
(``channels = 3``) and letterboxed to ``image_size``: scaled to fit inside it with the
aspect ratio kept, then padded with black on the two short sides
(``common.data.image_conversion``: transparency is composited on white, 16-bit samples are
scaled rather than clipped, CMYK becomes RGB; the report counts each such conversion).
Letterboxing rather than centre-cropping keeps every part of the image, so a caption that
mentions something near an edge stays true, and black padding matches the black background
of the built-in Fashion-MNIST source.

Captions longer than the model reads (``caption_words``, the tokenizer's word count) are
kept whole and counted in the report: the model sees their first ``caption_words`` words.

A record that cannot be used is skipped and counted by reason in a :class:`LoadReport`;
loading goes on with the rest. The report lists a few file names per reason (never caption
text). File names may themselves be personal data: keep the report at the site.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedmm.common.data.dataset import NO_LABEL, ImageTextDataset
from fedmm.common.data.image_conversion import PixelConversion, to_model_pixels
from fedmm.common.tokenizer import split_words

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
DEFAULT_IMAGE_SIZE = (28, 28)
DEFAULT_MAX_SIDE = 8192
MAX_EXAMPLES_PER_REASON = 5

# Raster formats decoded in-process by Pillow; anything else counts as not an image.
SUPPORTED_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


class SkipReason(StrEnum):
    """Why a record named in (or a line of) ``metadata.jsonl`` was left out."""

    NON_UTF8 = "non_utf8"  # the metadata line or its caption is not valid UTF-8
    MALFORMED_JSON = "malformed_json"  # the line is not a JSON object
    MALFORMED_RECORD = "malformed_record"  # file_name or text missing or not a string
    UNSAFE_FILE_NAME = "unsafe_file_name"  # absolute, or climbs out of root with ".."
    DUPLICATE_FILE_NAME = "duplicate_file_name"  # a later line naming the same file
    EMPTY_CAPTION = "empty_caption"  # empty or whitespace-only text
    BAD_LABEL = "bad_label"  # not an index >= 0 in range, nor a known class name
    MISSING_FILE = "missing_file"  # named in metadata, not a file under root
    UNREADABLE_FILE = "unreadable_file"  # the operating system refused to read it
    EMPTY_FILE = "empty_file"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # not an image in a supported format
    CORRUPT_IMAGE = "corrupt_image"  # identified, but decoding failed (e.g. truncated)
    BAD_DIMENSIONS = "bad_dimensions"  # a side of 0 or above max_side
    DECOMPRESSION_BOMB = "decompression_bomb"  # above Pillow's pixel limit


@dataclass
class LoadReport:
    """What :func:`load_imagefolder` kept and what it skipped, by reason."""

    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    label_names: list[str] | None = None
    max_examples: int = MAX_EXAMPLES_PER_REASON
    conversions: dict[str, int] = field(default_factory=dict)  # loaded images, by kind
    caption_words: int | None = None  # words the model reads; None: not checked
    captions_truncated: int = 0  # loaded captions longer than caption_words

    @property
    def total_skipped(self) -> int:
        """Number of records (or metadata lines) skipped for any reason."""
        return sum(self.skipped.values())

    def record_skip(self, reason: SkipReason, where: str) -> None:
        """Count one skip; keep ``where`` (a file name or metadata line) as an example."""
        self.skipped[reason.value] = self.skipped.get(reason.value, 0) + 1
        examples = self.examples.setdefault(reason.value, [])
        if len(examples) < self.max_examples:
            examples.append(where)

    def record_conversions(self, conversions: list[PixelConversion]) -> None:
        """Count the pixel conversions of one loaded image."""
        for conversion in conversions:
            self.conversions[conversion.value] = self.conversions.get(conversion.value, 0) + 1

    def summary(self) -> str:
        """One line: loaded and skipped counts, the skips by reason, conversions and
        truncated captions."""
        by_reason = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
        skipped = f"skipped {self.total_skipped}" + (f" ({by_reason})" if by_reason else "")
        line = f"loaded {self.loaded} records, {skipped}"
        if self.conversions:
            line += "; images converted: " + ", ".join(
                f"{kind}={count}" for kind, count in sorted(self.conversions.items())
            )
        if self.caption_words is not None:
            line += (
                f"; {self.captions_truncated} captions longer than {self.caption_words} words "
                "(the model reads the first ones)"
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy: counts, example file names per reason, label names."""
        return {
            "loaded": self.loaded,
            "skipped_total": self.total_skipped,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {reason: list(names) for reason, names in sorted(self.examples.items())},
            "label_names": None if self.label_names is None else list(self.label_names),
            "conversions": dict(sorted(self.conversions.items())),
            "caption_words": self.caption_words,
            "captions_truncated": self.captions_truncated,
        }


@dataclass(frozen=True)
class _MetadataRecord:
    """One well-formed line of ``metadata.jsonl``, before its image is read."""

    file_name: str
    caption: str
    raw_label: object


class _Skipped(Exception):
    """Raised inside the loader when a record must be skipped; carries the reason."""

    def __init__(self, reason: SkipReason, where: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.where = where


def load_imagefolder(
    root: Path,
    *,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    channels: int = 1,
    max_side: int = DEFAULT_MAX_SIDE,
    label_names: Sequence[str] | None = None,
    caption_words: int | None = None,
) -> tuple[ImageTextDataset, LoadReport]:
    """Load every usable record of an imagefolder directory, and report the rest.

    Args:
        root: the directory holding ``metadata.jsonl`` and the images.
        image_size: ``(height, width)`` of the returned images.
        channels: 1 for grayscale images ``(H, W)``, 3 for RGB ``(H, W, 3)``.
        max_side: images whose width or height exceeds this are skipped unread.
        label_names: class names in index order; a name label maps to its position.
        caption_words: the words of a caption the model reads; longer captions are
            counted in the report (None: not counted).

    Returns:
        The records in ``metadata.jsonl`` order (``uint8`` images of ``image_size`` with
        ``channels``) and the :class:`LoadReport`.

    Raises:
        FileNotFoundError: ``root`` or ``root/metadata.jsonl`` does not exist.
        NotADirectoryError: ``root`` is not a directory.
        ValueError: ``image_size``, ``channels``, ``max_side``, ``label_names`` or
            ``caption_words`` is invalid.
    """
    root = Path(root)
    _check_load_arguments(
        image_size=image_size,
        channels=channels,
        max_side=max_side,
        label_names=label_names,
        caption_words=caption_words,
    )
    metadata_path = _metadata_path(root)
    return _load_from(
        str(root),
        metadata_path.read_bytes(),
        lambda name: _open_image_file(root / name),
        image_size=image_size,
        channels=channels,
        max_side=max_side,
        label_names=label_names,
        caption_words=caption_words,
    )


def load_imagefolder_files(
    files: Mapping[str, bytes],
    *,
    name: str = "in-memory imagefolder",
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    channels: int = 1,
    max_side: int = DEFAULT_MAX_SIDE,
    label_names: Sequence[str] | None = None,
    caption_words: int | None = None,
) -> tuple[ImageTextDataset, LoadReport]:
    """:func:`load_imagefolder` of a folder held in memory: ``files`` maps each file's path
    relative to the folder (``"metadata.jsonl"``, ``"scans/a.png"``) to its bytes, so a
    folder decrypted from a cache never touches the disk in the clear. ``name`` is what
    the log calls it. The same checks and skips apply."""
    _check_load_arguments(
        image_size=image_size,
        channels=channels,
        max_side=max_side,
        label_names=label_names,
        caption_words=caption_words,
    )
    if METADATA_FILE not in files:
        raise FileNotFoundError(f"{name} has no {METADATA_FILE}")

    def open_image(file_name: str) -> BinaryIO:
        content = files.get(file_name)
        if content is None:
            raise _Skipped(SkipReason.MISSING_FILE)
        if not content:
            raise _Skipped(SkipReason.EMPTY_FILE)
        return io.BytesIO(content)

    return _load_from(
        name,
        files[METADATA_FILE],
        open_image,
        image_size=image_size,
        channels=channels,
        max_side=max_side,
        label_names=label_names,
        caption_words=caption_words,
    )


def _load_from(
    name: str,
    metadata: bytes,
    open_image: Callable[[str], BinaryIO],
    *,
    image_size: tuple[int, int],
    channels: int,
    max_side: int,
    label_names: Sequence[str] | None,
    caption_words: int | None,
) -> tuple[ImageTextDataset, LoadReport]:
    report = LoadReport(caption_words=caption_words)
    records = _drop_duplicate_file_names(_read_metadata(metadata, report), report)
    vocabulary = _label_vocabulary(records, label_names)
    report.label_names = vocabulary

    dataset = _load_records(
        open_image,
        records,
        vocabulary,
        report,
        image_size=image_size,
        channels=channels,
        max_side=max_side,
    )
    if caption_words is not None:
        report.captions_truncated = sum(
            len(split_words(caption)) > caption_words for caption in dataset.captions
        )
    _log_summary(name, report)
    return dataset, report


def _load_records(
    open_image: Callable[[str], BinaryIO],
    records: list[_MetadataRecord],
    vocabulary: list[str] | None,
    report: LoadReport,
    *,
    image_size: tuple[int, int],
    channels: int,
    max_side: int,
) -> ImageTextDataset:
    """The records whose label and image are usable; the others go to the report."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    labels: list[int] = []
    for record in records:
        try:
            label = _resolve_label(record.raw_label, vocabulary)
            pixels, conversions = _load_image(
                open_image(record.file_name),
                image_size=image_size,
                channels=channels,
                max_side=max_side,
            )
        except _Skipped as skipped:
            report.record_skip(skipped.reason, record.file_name)
            continue
        report.record_conversions(conversions)
        images.append(pixels)
        captions.append(record.caption)
        labels.append(label)
    report.loaded = len(captions)
    empty_shape = (0, *image_size) if channels == 1 else (0, *image_size, channels)
    return ImageTextDataset(
        images=np.stack(images) if images else np.zeros(empty_shape, dtype=np.uint8),
        captions=captions,
        labels=np.asarray(labels, dtype=np.int64),
    )


def _check_load_arguments(
    *,
    image_size: tuple[int, int],
    channels: int,
    max_side: int,
    label_names: Sequence[str] | None,
    caption_words: int | None,
) -> None:
    """Raise a ValueError for arguments that no folder could satisfy."""
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be (height, width) of positive ints, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if caption_words is not None and (not isinstance(caption_words, int) or caption_words < 1):
        raise ValueError(f"caption_words must be a positive int or None, got {caption_words!r}")
    if not isinstance(max_side, int) or max_side <= 0:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    if label_names is not None:
        if isinstance(label_names, str) or not all(isinstance(n, str) for n in label_names):
            raise ValueError("label_names must be a sequence of strings")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names must be distinct, got {list(label_names)}")


def _metadata_path(root: Path) -> Path:
    """``root/metadata.jsonl``, or an error that names the path and how to fix it."""
    if not root.exists():
        raise FileNotFoundError(
            f"image folder {root} does not exist: pass the directory that holds your "
            f"images and {METADATA_FILE}"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"image folder {root} is not a directory: pass the directory that holds your "
            f"images and {METADATA_FILE}"
        )
    metadata_path = root / METADATA_FILE
    if not metadata_path.is_file():
        hint = " (metadata.csv is not supported: convert it to JSON lines)"
        raise FileNotFoundError(
            f"{metadata_path} not found: create it with one JSON object per line, e.g. "
            '{"file_name": "0001.png", "text": "a red shoe", "label": "shoe"} '
            f"(label optional; file_name relative to {root})"
            + (hint if (root / "metadata.csv").exists() else "")
        )
    return metadata_path


def _read_metadata(metadata: bytes, report: LoadReport) -> list[_MetadataRecord]:
    """The well-formed records of ``metadata.jsonl``; the other lines go to the report."""
    records = []
    for line_number, raw_line in _metadata_lines(metadata):
        try:
            records.append(_parse_metadata_line(raw_line))
        except _Skipped as skipped:
            report.record_skip(skipped.reason, skipped.where or f"{METADATA_FILE}:{line_number}")
    return records


def _metadata_lines(content: bytes) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers, without BOM or line endings."""
    content = content.removeprefix(b"\xef\xbb\xbf")
    for line_number, raw_line in enumerate(content.split(b"\n"), start=1):
        if raw_line.strip():
            yield line_number, raw_line.rstrip(b"\r")


def _parse_metadata_line(raw_line: bytes) -> _MetadataRecord:
    """One record from one line of bytes, or ``_Skipped`` saying what is wrong with it."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skipped(SkipReason.NON_UTF8, _file_name_for_report(raw_line)) from None
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        raise _Skipped(SkipReason.MALFORMED_JSON) from None
    if not isinstance(entry, dict):
        raise _Skipped(SkipReason.MALFORMED_JSON)
    file_name, text = entry.get("file_name"), entry.get("text")
    if not isinstance(file_name, str) or not file_name or not isinstance(text, str):
        raise _Skipped(
            SkipReason.MALFORMED_RECORD, file_name if isinstance(file_name, str) else None
        )
    file_name = _safe_relative_file_name(file_name)
    return _MetadataRecord(
        file_name=file_name, caption=_checked_caption(text, file_name), raw_label=entry.get("label")
    )


def _file_name_for_report(raw_line: bytes) -> str | None:
    """The file name of a line that is not UTF-8, read leniently, if it can be found."""
    try:
        entry = json.loads(raw_line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    return file_name if isinstance(file_name, str) and file_name else None


def _safe_relative_file_name(file_name: str) -> str:
    """``file_name`` normalised (``./a.png`` -> ``a.png``), refused if it leaves root."""
    path = PurePosixPath(file_name)
    if path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise _Skipped(SkipReason.UNSAFE_FILE_NAME, file_name)
    return str(path)


def _checked_caption(text: str, file_name: str) -> str:
    """The caption without surrounding whitespace; refused if empty or not UTF-8."""
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError:
        raise _Skipped(SkipReason.NON_UTF8, file_name) from None
    caption = text.strip()
    if not caption:
        raise _Skipped(SkipReason.EMPTY_CAPTION, file_name)
    return caption


def _drop_duplicate_file_names(
    records: list[_MetadataRecord], report: LoadReport
) -> list[_MetadataRecord]:
    """Keep the first line that names each file; count the later ones as skipped."""
    seen: set[str] = set()
    unique = []
    for record in records:
        if record.file_name in seen:
            report.record_skip(SkipReason.DUPLICATE_FILE_NAME, record.file_name)
            continue
        seen.add(record.file_name)
        unique.append(record)
    return unique


def _label_vocabulary(
    records: list[_MetadataRecord], label_names: Sequence[str] | None
) -> list[str] | None:
    """Class names in index order: the given ones, else the sorted names found, else None."""
    if label_names is not None:
        return list(label_names)
    found = sorted({record.raw_label for record in records if isinstance(record.raw_label, str)})
    return found or None


def _resolve_label(raw_label: object, vocabulary: list[str] | None) -> int:
    """The class index of a raw ``label`` value; ``NO_LABEL`` when it is absent."""
    if raw_label is None:
        return NO_LABEL
    if isinstance(raw_label, str) and vocabulary is not None and raw_label in vocabulary:
        return vocabulary.index(raw_label)
    is_index = isinstance(raw_label, int) and not isinstance(raw_label, bool)
    if is_index and raw_label >= 0 and (vocabulary is None or raw_label < len(vocabulary)):
        return raw_label
    raise _Skipped(SkipReason.BAD_LABEL)


def _open_image_file(path: Path) -> BinaryIO:
    """The image file at ``path``, open for reading; or ``_Skipped``."""
    _check_image_file(path)
    try:
        return path.open("rb")
    except OSError:
        raise _Skipped(SkipReason.UNREADABLE_FILE) from None


def _load_image(
    stream: BinaryIO, *, image_size: tuple[int, int], channels: int, max_side: int
) -> tuple[np.ndarray, list[PixelConversion]]:
    """The image in ``stream`` as letterboxed ``uint8`` pixels with ``channels``, and the
    conversions it took; or ``_Skipped``."""
    with stream, warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit: make that a skip too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(stream, formats=SUPPORTED_IMAGE_FORMATS) as image:
                _check_dimensions(image.size, max_side)
                # JPEG: decode smaller (and straight to gray for a grayscale model)
                image.draft("L" if channels == 1 else "RGB", (image_size[1], image_size[0]))
                upright = ImageOps.exif_transpose(image)
                return to_model_pixels(upright, image_size=image_size, channels=channels)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _Skipped(SkipReason.DECOMPRESSION_BOMB) from None
        except UnidentifiedImageError:
            raise _Skipped(SkipReason.NOT_AN_IMAGE) from None
        except _Skipped:
            raise
        except Exception:  # a hostile file may break a decoder in any way
            raise _Skipped(SkipReason.CORRUPT_IMAGE) from None


def _check_image_file(path: Path) -> None:
    """Skip names that are not regular files under root, and empty files."""
    try:
        if not path.is_file():
            raise _Skipped(SkipReason.MISSING_FILE)
        if path.stat().st_size == 0:
            raise _Skipped(SkipReason.EMPTY_FILE)
    except OSError:
        raise _Skipped(SkipReason.UNREADABLE_FILE) from None


def _check_dimensions(size: tuple[int, int], max_side: int) -> None:
    """Skip images with a zero side or a side above ``max_side`` before decoding them."""
    width, height = size
    if min(width, height) <= 0 or max(width, height) > max_side:
        raise _Skipped(SkipReason.BAD_DIMENSIONS)


def _log_summary(root: str, report: LoadReport) -> None:
    """One log line per load; a warning when anything was skipped."""
    level = logging.WARNING if report.total_skipped else logging.INFO
    logger.log(level, "imagefolder %s: %s", root, report.summary())
