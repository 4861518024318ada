"""De-identifying a whole imagefolder dataset end to end, with real detectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.data import astronaut

from fedmm.client.deid.face_detection import HaarCascadeDetector
from fedmm.client.deid.imagefolder import deidentify_imagefolder
from fedmm.client.deid.policy import DeidPolicy
from fedmm.client.deid.pseudonymise import TextAction

SECRET = bytes(range(32))
CAPTIONS = {
    "train/astronaut.png": "Eileen Collins on 1999-07-23, contact eileen@example.com",
    "train/blank.jpg": "An empty grey frame, no people.",
}
PII = ["Eileen", "Collins", "1999-07-23", "eileen@example.com"]


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x013B] = "Eileen Collins"  # Artist tag
    Image.fromarray(astronaut()).save(src / "train" / "astronaut.png", exif=exif)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(src / "train" / "blank.jpg")
    (src / "train" / "broken.png").write_bytes(b"not an image")
    (src / "train" / "notes.txt").write_text("Eileen Collins' private notes")
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in CAPTIONS.items()]
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return src


def test_faces_and_captions_are_de_identified(dataset: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    calls: list[tuple[int, int]] = []
    report = deidentify_imagefolder(
        dataset, dst, DeidPolicy(), SECRET, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (5, 5)
    out = np.asarray(Image.open(dst / "train" / "astronaut.png"))
    assert out.shape == astronaut().shape
    assert HaarCascadeDetector().detect(out) == []
    assert not Image.open(dst / "train" / "astronaut.png").getexif()
    records = [json.loads(line) for line in (dst / "metadata.jsonl").read_text().splitlines()]
    assert records[0]["file_name"] == "train/astronaut.png"
    assert records[0]["text"].startswith("<PERSON_")
    assert records[1]["text"] == CAPTIONS["train/blank.jpg"]
    for path in dst.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(value.encode() in content for value in PII), path
    audit = report.to_dict()
    assert audit["faces_by_detector"] == {"haar": 1}
    assert audit["pii_by_type"] == {"DATE": 1, "EMAIL": 1, "PERSON": 1}
    assert audit["skipped"] == [
        {"path": "train/broken.png", "reason": "unreadable: UnidentifiedImageError"},
        {"path": "train/notes.txt", "reason": "not an image or metadata.jsonl"},
    ]
    assert not (dst / "train" / "notes.txt").exists()
    assert not (dst / "train" / "broken.png").exists()
    assert not any(value in report.to_json() for value in PII)


def test_running_twice_gives_the_same_bytes(dataset: Path, tmp_path: Path) -> None:
    policy = DeidPolicy(text_action=TextAction.REDACT)
    first = deidentify_imagefolder(dataset, tmp_path / "a", policy, SECRET)
    second = deidentify_imagefolder(dataset, tmp_path / "a", policy, SECRET)
    deidentify_imagefolder(dataset, tmp_path / "b", policy, SECRET)
    assert first.to_json() == second.to_json()
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b
    for rel in files_a:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    text = (tmp_path / "a" / "metadata.jsonl").read_text()
    assert "<PERSON> on <DATE>, contact <EMAIL>" in text


def test_destination_inside_source_is_refused(dataset: Path) -> None:
    with pytest.raises(ValueError, match="destination"):
        deidentify_imagefolder(dataset, dataset / "out", DeidPolicy(), SECRET)


def test_exif_orientation_is_applied_before_metadata_is_dropped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(src / "rotated.png", exif=exif)
    deidentify_imagefolder(src, tmp_path / "dst", DeidPolicy(), SECRET)
    out = Image.open(tmp_path / "dst" / "rotated.png")
    assert out.size == (20, 40)
    assert not out.getexif()
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_greyscale_keeps_its_depth(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    grey = (astronaut().mean(axis=2) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(grey).save(src / "scan.png")
    report = deidentify_imagefolder(src, tmp_path / "dst", DeidPolicy(), SECRET)
    out = np.asarray(Image.open(tmp_path / "dst" / "scan.png"))
    assert out.dtype == np.uint16
    assert out.shape == grey.shape
    assert report.to_dict()["faces_by_detector"] == {"haar": 1}
    assert HaarCascadeDetector().detect(out) == []
    untouched = np.ones(grey.shape, bool)
    untouched[:200, 150:320] = False
    assert np.array_equal(out[untouched], grey[untouched])


def test_transparency_is_composited_on_white_not_dropped(tmp_path: Path) -> None:
    """Clipart is mostly transparent: dropping alpha would leave the drawing's hidden colour
    (often black) everywhere. The de-identified copy composites on the model loader's white."""
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)  # transparent black everywhere
    rgba[8:24, 8:24] = [200, 0, 0, 255]  # an opaque red square
    Image.fromarray(rgba, mode="RGBA").save(src / "drawing.png")
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = palette.getpixel((0, 0))
    palette.save(src / "palette.png", transparency=palette.getpixel((0, 0)))
    deidentify_imagefolder(src, tmp_path / "dst", DeidPolicy(), SECRET)
    for name in ("drawing.png", "palette.png"):
        out = np.asarray(Image.open(tmp_path / "dst" / name).convert("RGB"))
        assert out[0, 0].tolist() == [255, 255, 255], name
        assert out[16, 16].tolist() == [200, 0, 0], name


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` and which holds no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_skipped_and_counted_not_fatal(tmp_path: Path) -> None:
    """OpenClipart holds drawings of 105-231 million pixels: Pillow refuses them with its
    own error (not an OSError); the site skips the file instead of failing every round."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(src / "fine.png")
    report = deidentify_imagefolder(src, tmp_path / "dst", DeidPolicy(), SECRET)
    assert (tmp_path / "dst" / "fine.png").exists()
    assert not (tmp_path / "dst" / "bomb.png").exists()
    assert "DecompressionBombError" in json.dumps(report.to_dict())


def test_an_image_above_pillows_pixel_limit_is_skipped_before_it_is_decoded(
    tmp_path: Path,
) -> None:
    """Between Pillow's limit and twice it Pillow only warns: the model's loader skips such
    an image, so de-identification skips it too instead of decoding gigabytes."""
    src = tmp_path / "src"
    src.mkdir()
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # 1.5x the limit: the warning zone
    (src / "huge.png").write_bytes(_png_header_only(side, side))
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(src / "fine.png")
    report = deidentify_imagefolder(src, tmp_path / "dst", DeidPolicy(), SECRET)
    assert (tmp_path / "dst" / "fine.png").exists()
    assert not (tmp_path / "dst" / "huge.png").exists()
    assert "DecompressionBombWarning" in json.dumps(report.to_dict())
