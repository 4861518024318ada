"""Loading an imagefolder directory: good records kept, every kind of bad one skipped."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.common.data.dataset import NO_LABEL
from fedmm.common.data.imagefolder import (
    METADATA_FILE,
    LoadReport,
    SkipReason,
    load_imagefolder,
)

SECRET_CAPTION = "private caption of patient Jane Roe"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` grayscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_metadata(root: Path, lines: list[bytes | dict]) -> None:
    """``metadata.jsonl`` from dicts (JSON-encoded) and raw byte lines (written as is)."""
    encoded = [
        line if isinstance(line, bytes) else json.dumps(line).encode("utf-8") for line in lines
    ]
    (root / METADATA_FILE).write_bytes(b"\n".join(encoded) + b"\n")


def save_gray(path: Path, value: int, size: tuple[int, int] = (16, 16)) -> None:
    """A uniform grayscale image of PIL ``size`` (width, height) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color=value).save(path)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Four good records and one of every kind of bad one."""
    save_gray(tmp_path / "good_png.png", 200)
    Image.new("RGB", (20, 20), color=(255, 0, 0)).save(tmp_path / "good_jpg.jpg", quality=95)
    save_gray(tmp_path / "sub" / "good_nested.png", 100)
    save_gray(tmp_path / "good_dup.png", 50)
    truncated = png_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    )
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 200)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    save_gray(tmp_path / "too_wide.png", 30, size=(8200, 2))
    save_gray(tmp_path / "non_utf8.png", 10)
    save_gray(tmp_path / "blank.png", 10)
    save_gray(tmp_path / "surrogate.png", 10)
    (tmp_path / "a_directory.png").mkdir()
    write_metadata(
        tmp_path,
        [
            {"file_name": "good_png.png", "text": "  a pale square  ", "label": "shirt"},
            {"file_name": "good_jpg.jpg", "text": "a red square", "label": 1},
            {"file_name": "./sub/good_nested.png", "text": "a grey square"},
            {"file_name": "good_dup.png", "text": "first line wins", "label": "bag"},
            {"file_name": "good_dup.png", "text": SECRET_CAPTION},
            {"file_name": "truncated.png", "text": SECRET_CAPTION},
            {"file_name": "garbage.jpg", "text": SECRET_CAPTION},
            {"file_name": "empty.png", "text": SECRET_CAPTION},
            {"file_name": "notes.png", "text": SECRET_CAPTION},
            {"file_name": "bomb.png", "text": SECRET_CAPTION},
            {"file_name": "too_wide.png", "text": SECRET_CAPTION},
            {"file_name": "missing.png", "text": SECRET_CAPTION},
            {"file_name": "a_directory.png", "text": SECRET_CAPTION},
            b'{"file_name": "non_utf8.png", "text": "caf\xe9 au lait"}',
            {"file_name": "blank.png", "text": " \t\n "},
            {"file_name": "surrogate.png", "text": "lone \ud800 surrogate"},
            b'{"file_name": "cut_short.png", "text": "private',
            b"[1, 2, 3]",
            {"file_name": "no_text.png"},
            {"file_name": "../outside.png", "text": SECRET_CAPTION},
            {"file_name": "/etc/passwd", "text": SECRET_CAPTION},
            {"file_name": "good_png.png", "text": SECRET_CAPTION, "label": "not-a-class"},
            b"   ",
        ],
    )
    return tmp_path


EXPECTED_SKIPS = {
    SkipReason.DUPLICATE_FILE_NAME: 2,
    SkipReason.CORRUPT_IMAGE: 2,
    SkipReason.EMPTY_FILE: 1,
    SkipReason.NOT_AN_IMAGE: 1,
    SkipReason.DECOMPRESSION_BOMB: 1,
    SkipReason.BAD_DIMENSIONS: 1,
    SkipReason.MISSING_FILE: 2,
    SkipReason.NON_UTF8: 2,
    SkipReason.EMPTY_CAPTION: 1,
    SkipReason.MALFORMED_JSON: 2,
    SkipReason.MALFORMED_RECORD: 1,
    SkipReason.UNSAFE_FILE_NAME: 2,
}


def test_messy_folder_keeps_good_records_and_counts_each_skip(messy_folder: Path) -> None:
    dataset, report = load_imagefolder(messy_folder, label_names=["shirt", "trouser", "bag"])

    assert dataset.captions == ["a pale square", "a red square", "a grey square", "first line wins"]
    assert dataset.labels.tolist() == [0, 1, NO_LABEL, 2]
    assert dataset.images.shape == (4, 28, 28)
    assert dataset.images.dtype == np.uint8
    assert report.loaded == 4
    assert report.skipped == {reason.value: n for reason, n in EXPECTED_SKIPS.items()}
    assert report.total_skipped == sum(EXPECTED_SKIPS.values())


def test_grayscale_values_survive_conversion(messy_folder: Path) -> None:
    dataset, _ = load_imagefolder(messy_folder, label_names=["shirt", "trouser", "bag"])

    assert np.all(np.abs(dataset.images[0].astype(int) - 200) <= 1)
    # pure red in ITU-R 601 luma: 0.299 * 255 = 76
    assert np.all(np.abs(dataset.images[1].astype(int) - 76) <= 3)
    assert np.all(np.abs(dataset.images[2].astype(int) - 100) <= 1)


def test_report_names_files_and_lines_but_never_captions(messy_folder: Path) -> None:
    _, report = load_imagefolder(messy_folder, label_names=["shirt", "trouser", "bag"])
    as_json = json.dumps(report.to_dict())

    assert SECRET_CAPTION not in as_json
    assert "private" not in as_json
    assert "caf" not in as_json
    examples = report.to_dict()["examples"]
    assert examples["decompression_bomb"] == ["bomb.png"]
    assert examples["non_utf8"] == ["non_utf8.png", "surrogate.png"]
    assert examples["missing_file"] == ["missing.png", "a_directory.png"]
    assert examples["malformed_json"] == [f"{METADATA_FILE}:17", f"{METADATA_FILE}:18"]


def test_bad_label_and_duplicate_are_told_apart(tmp_path: Path) -> None:
    save_gray(tmp_path / "a.png", 1)
    save_gray(tmp_path / "b.png", 2)
    save_gray(tmp_path / "c.png", 3)
    write_metadata(
        tmp_path,
        [
            {"file_name": "a.png", "text": "x", "label": "not-a-class"},
            {"file_name": "b.png", "text": "x", "label": 7},
            {"file_name": "c.png", "text": "x", "label": True},
        ],
    )
    dataset, report = load_imagefolder(tmp_path, label_names=["shirt", "bag"])

    assert len(dataset) == 0
    assert dataset.images.shape == (0, 28, 28)
    assert report.skipped == {"bad_label": 3}
    assert report.examples["bad_label"] == ["a.png", "b.png", "c.png"]


def test_label_names_inferred_sorted_and_ints_index_into_them(tmp_path: Path) -> None:
    for name in "abcde":
        save_gray(tmp_path / f"{name}.png", 9)
    write_metadata(
        tmp_path,
        [
            {"file_name": "a.png", "text": "x", "label": "sneaker"},
            {"file_name": "b.png", "text": "x", "label": "bag"},
            {"file_name": "c.png", "text": "x", "label": 1},
            {"file_name": "d.png", "text": "x", "label": 2},
            {"file_name": "e.png", "text": "x", "label": None},
        ],
    )
    dataset, report = load_imagefolder(tmp_path)

    assert report.label_names == ["bag", "sneaker"]
    assert dataset.labels.tolist() == [1, 0, 1, NO_LABEL]
    assert report.skipped == {"bad_label": 1}


def test_integer_labels_without_names_are_kept_as_they_are(tmp_path: Path) -> None:
    for name in "abc":
        save_gray(tmp_path / f"{name}.png", 9)
    write_metadata(
        tmp_path,
        [
            {"file_name": "a.png", "text": "x", "label": 12},
            {"file_name": "b.png", "text": "x", "label": -1},
            {"file_name": "c.png", "text": "x", "label": 0},
        ],
    )
    dataset, report = load_imagefolder(tmp_path)

    assert report.label_names is None
    assert dataset.labels.tolist() == [12, 0]
    assert report.skipped == {"bad_label": 1}


def test_warning_sized_decompression_bomb_is_skipped_not_loaded(tmp_path: Path) -> None:
    # 100 M pixels: above Pillow's limit (89 M), below twice it, so Pillow only warns.
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(10_000, 10_000))
    save_gray(tmp_path / "fine.png", 5)
    write_metadata(
        tmp_path,
        [{"file_name": "bomb.png", "text": "x"}, {"file_name": "fine.png", "text": "y"}],
    )
    dataset, report = load_imagefolder(tmp_path, max_side=20_000)

    assert dataset.captions == ["y"]
    assert report.skipped == {"decompression_bomb": 1}


def test_max_side_applies_to_real_images(tmp_path: Path) -> None:
    save_gray(tmp_path / "wide.png", 5, size=(100, 10))
    save_gray(tmp_path / "tall.png", 5, size=(10, 100))
    save_gray(tmp_path / "edge.png", 5, size=(64, 64))
    write_metadata(
        tmp_path,
        [{"file_name": name, "text": "x"} for name in ("wide.png", "tall.png", "edge.png")],
    )
    dataset, report = load_imagefolder(tmp_path, max_side=64)

    assert len(dataset) == 1
    assert report.skipped == {"bad_dimensions": 2}


def test_zero_sized_image_header_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(png_claiming_size(0, 10))
    write_metadata(tmp_path, [{"file_name": "zero.png", "text": "x"}])
    dataset, report = load_imagefolder(tmp_path)

    assert len(dataset) == 0
    # Pillow refuses a zero side while identifying the file; either reason is right.
    assert set(report.skipped) <= {"bad_dimensions", "not_an_image"}
    assert report.total_skipped == 1


def test_formats_outside_the_allow_list_are_not_opened(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), color=(9, 9, 9)).save(tmp_path / "icon.ico")
    write_metadata(tmp_path, [{"file_name": "icon.ico", "text": "x"}])
    _, report = load_imagefolder(tmp_path)

    assert report.skipped == {"not_an_image": 1}


def test_wide_image_is_letterboxed_with_black_bars(tmp_path: Path) -> None:
    save_gray(tmp_path / "wide.png", 255, size=(40, 20))  # width 40, height 20
    write_metadata(tmp_path, [{"file_name": "wide.png", "text": "x"}])
    dataset, _ = load_imagefolder(tmp_path, image_size=(28, 28))
    image = dataset.images[0]

    assert image.shape == (28, 28)
    assert np.all(image[:6] == 0) and np.all(image[-6:] == 0)  # bars top and bottom
    assert np.all(image[8:20] >= 250)  # the whole width of the image is kept


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("L", (40, 20), color=255).save(tmp_path / "rotated.png", exif=exif)
    write_metadata(tmp_path, [{"file_name": "rotated.png", "text": "x"}])
    dataset, _ = load_imagefolder(tmp_path, image_size=(28, 28))
    image = dataset.images[0]

    assert np.all(image[:, :6] == 0) and np.all(image[:, -6:] == 0)  # bars left and right
    assert np.all(image[:, 8:20] >= 250)


def test_image_size_is_height_then_width(tmp_path: Path) -> None:
    save_gray(tmp_path / "square.png", 255, size=(30, 30))
    write_metadata(tmp_path, [{"file_name": "square.png", "text": "x"}])
    dataset, _ = load_imagefolder(tmp_path, image_size=(16, 32))

    assert dataset.images.shape == (1, 16, 32)
    assert np.all(dataset.images[0][:, :8] == 0)  # bars left and right of the square


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 32_896, dtype=np.uint16)).save(tmp_path / "deep.png")
    write_metadata(tmp_path, [{"file_name": "deep.png", "text": "x"}])
    dataset, _ = load_imagefolder(tmp_path)

    assert np.all(dataset.images[0] == 128)


def test_metadata_with_bom_and_crlf_is_read(tmp_path: Path) -> None:
    save_gray(tmp_path / "a.png", 1)
    (tmp_path / METADATA_FILE).write_bytes(
        b'\xef\xbb\xbf{"file_name": "a.png", "text": "caption one"}\r\n'
    )
    dataset, report = load_imagefolder(tmp_path)

    assert dataset.captions == ["caption one"]
    assert report.total_skipped == 0


def test_missing_root_names_the_path_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*metadata\.jsonl"):
        load_imagefolder(root)


def test_missing_metadata_names_the_path_and_the_format(tmp_path: Path) -> None:
    save_gray(tmp_path / "a.png", 1)
    with pytest.raises(FileNotFoundError) as raised:
        load_imagefolder(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / METADATA_FILE) in message
    assert '"file_name"' in message and '"text"' in message


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    write_metadata(tmp_path, [])
    with pytest.raises(ValueError, match="image_size"):
        load_imagefolder(tmp_path, image_size=(0, 28))
    with pytest.raises(ValueError, match="max_side"):
        load_imagefolder(tmp_path, max_side=0)
    with pytest.raises(ValueError, match="distinct"):
        load_imagefolder(tmp_path, label_names=["a", "a"])


def test_summary_is_logged_on_one_line(
    messy_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedmm.common.data.imagefolder"):
        _, report = load_imagefolder(messy_folder, label_names=["shirt", "trouser", "bag"])

    summaries = [r for r in caplog.records if r.name == "fedmm.common.data.imagefolder"]
    assert len(summaries) == 1
    message = summaries[0].getMessage()
    assert "\n" not in message
    assert f"loaded 4 records, skipped {report.total_skipped}" in message
    assert "decompression_bomb=1" in message
    assert SECRET_CAPTION not in message


def test_report_keeps_at_most_max_examples_per_reason() -> None:
    report = LoadReport(max_examples=2)
    for name in ("a", "b", "c"):
        report.record_skip(SkipReason.MISSING_FILE, name)

    assert report.to_dict() == {
        "loaded": 0,
        "skipped_total": 3,
        "skipped": {"missing_file": 3},
        "examples": {"missing_file": ["a", "b"]},
        "label_names": None,
        "conversions": {},
        "caption_words": None,
        "captions_truncated": 0,
    }


def test_captions_longer_than_the_model_reads_are_counted_not_cut(tmp_path: Path) -> None:
    """Words as the tokenizer counts them: stopwords ("a", "the", "of") do not count."""
    for name in "abc":
        save_gray(tmp_path / f"{name}.png", 9)
    long_caption = "left lower lobe consolidation with a small effusion on the right side"
    write_metadata(
        tmp_path,
        [
            {"file_name": "a.png", "text": long_caption},
            {"file_name": "b.png", "text": "a photo of the left lower lobe"},
            {"file_name": "c.png", "text": "one two three four five"},
        ],
    )
    data, report = load_imagefolder(tmp_path, caption_words=5)

    assert data.captions[0] == long_caption  # kept whole: the tokenizer cuts
    assert report.captions_truncated == 1
    assert "1 captions longer than 5 words" in report.summary()
    assert long_caption not in json.dumps(report.to_dict())
    with pytest.raises(ValueError, match="caption_words"):
        load_imagefolder(tmp_path, caption_words=0)
    with pytest.raises(ValueError, match="channels"):
        load_imagefolder(tmp_path, channels=4)
