"""De-identify one record (image, caption) or a whole imagefolder dataset under a policy.

An imagefolder dataset is a directory tree of images with optional ``metadata.jsonl`` files
whose lines hold ``file_name`` and text fields such as ``text`` or ``caption`` (the
Hugging Face ``imagefolder`` layout). The output tree mirrors the input: every image with its
faces anonymised and its metadata stripped (EXIF may hold GPS positions, names, serial
numbers), every metadata line with all its string fields but ``file_name`` de-identified.
Anything else is skipped and listed in the audit, never copied. Files are processed in sorted
order and written deterministically, so running twice gives the same output.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from fedmm.client.deid.audit import AuditReport, tool_versions
from fedmm.client.deid.face_anonymisation import anonymise_faces
from fedmm.client.deid.face_detection import Box, FaceDetector, build_face_detector
from fedmm.client.deid.policy import DeidPolicy
from fedmm.client.deid.pseudonymise import replace_spans
from fedmm.client.deid.text_pii import PiiSpan, find_pii
from fedmm.common.data.image_conversion import flatten_transparency

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"

#: Called as ``progress(files_done, files_total)`` after each file.
ProgressCallback = Callable[[int, int], None]
#: Receives each output file as ``sink(path relative to the output folder, content)``.
FileSink = Callable[[str, bytes], None]


def _folder_sink(dst: Path) -> FileSink:
    """A sink writing each file under ``dst``."""

    def write(relative: str, content: bytes) -> None:
        target = dst / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)

    return write


def deidentify_caption(text: str, policy: DeidPolicy, secret: bytes) -> tuple[str, list[PiiSpan]]:
    """``text`` with the personal data of the policy's enabled types replaced per policy,
    and the spans found (offsets into the original ``text``)."""
    spans = find_pii(text, enabled=policy.enabled_types, phone_regions=policy.phone_regions)
    return replace_spans(text, spans, action=policy.text_action, secret=secret), spans


def deidentify_image(
    image: np.ndarray, policy: DeidPolicy, detector: FaceDetector
) -> tuple[np.ndarray, list[Box]]:
    """``image`` with every face ``detector`` finds anonymised per policy, and the boxes.
    With ``policy.detect_faces`` off the image is returned as it is."""
    if not policy.detect_faces:
        return image, []
    boxes = detector.detect(image)
    out = anonymise_faces(
        image,
        boxes,
        mode=policy.face_mode,
        blur_scale=policy.blur_scale,
        margin=policy.face_margin,
        pixel_blocks=policy.pixel_blocks,
    )
    return out, boxes


def _deidentify_image_file(
    src: Path, dst: str, policy: DeidPolicy, detector: FaceDetector, report: AuditReport
) -> bytes:
    """The de-identified image ``src`` encoded in the format ``dst``'s suffix names."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # Above Pillow's pixel limit (its warning, below twice the limit where it refuses):
        # the model's loader skips such an image, so decoding it here would only cost
        # gigabytes (a 168-million-pixel drawing took a site's process past 5 GB).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(src)
    with img:
        img.load()
        # Apply the EXIF orientation now: the metadata that carried it is dropped below.
        upright = ImageOps.exif_transpose(img)
        if upright.mode.startswith("I;16"):
            mode = "I;16"  # 16-bit greyscale (scans) keeps its depth
            pixels = np.asarray(upright).astype(np.uint16)
        elif _has_transparency(upright):
            # Composited on the background the model's loader uses: dropping alpha would
            # turn most transparent drawings into black squares.
            mode = "RGB"
            pixels = np.asarray(flatten_transparency(upright)[0])
        else:
            mode = "L" if upright.mode in ("L", "1") else "RGB"
            pixels = np.asarray(upright.convert(mode))
    out, boxes = deidentify_image(pixels, policy, detector)
    report.record_image(boxes)
    # A fresh image from the pixels alone: no EXIF, ICC, XMP or text chunks are carried over.
    fresh = Image.fromarray(out) if mode == "I;16" else Image.fromarray(out, mode=mode)
    suffix = PurePosixPath(dst).suffix.lower()
    encoded = io.BytesIO()
    if suffix in (".jpg", ".jpeg"):
        fresh.save(encoded, format="JPEG", quality=95, optimize=False)
    else:
        fresh.save(encoded, format=Image.registered_extensions()[suffix])
    return encoded.getvalue()


def _has_transparency(image: Any) -> bool:
    """RGBA, LA, PA, or a palette/greyscale/RGB image with a transparency entry."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _deidentify_metadata_file(
    src: Path, policy: DeidPolicy, secret: bytes, report: AuditReport
) -> bytes:
    lines_out = []
    for number, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is not a JSON object")
        for key, value in record.items():
            if key != "file_name" and isinstance(value, str):
                record[key], spans = deidentify_caption(value, policy, secret)
                report.record_caption(spans)
        lines_out.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
    return "".join(line + "\n" for line in lines_out).encode("utf-8")


def deidentify_imagefolder(
    src: Path,
    dst: Path,
    policy: DeidPolicy,
    secret: bytes,
    progress: ProgressCallback | None = None,
    *,
    sink: FileSink | None = None,
) -> AuditReport:
    """De-identify the imagefolder dataset ``src`` into ``dst`` and return the audit report
    (the caller decides where to write it, e.g. ``dst / "audit.json"``).

    With ``sink``, nothing is written to ``dst``: each output file goes to
    ``sink(relative POSIX path, bytes)`` instead (an encrypted cache keeps the de-identified
    copy off the disk in the clear)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"source {src} is not a directory")
    if sink is None:
        if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
            raise ValueError("destination must not be the source or inside it")
        sink = _folder_sink(dst)
    # Not OSErrors: Pillow's pixel limit (the warning is raised as an error when decoding).
    from PIL.Image import DecompressionBombError, DecompressionBombWarning

    detector = build_face_detector(policy.face_detectors, min_face_size=policy.min_face_size)
    report = AuditReport(policy=policy.to_dict(), tool_versions=tool_versions(detector.versions()))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for done, path in enumerate(files, start=1):
        relative = path.relative_to(src).as_posix()
        try:
            if path.name == METADATA_NAME:
                sink(relative, _deidentify_metadata_file(path, policy, secret, report))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                sink(relative, _deidentify_image_file(path, relative, policy, detector, report))
            else:
                report.record_skip(relative, "not an image or metadata.jsonl")
        except (OSError, ValueError, DecompressionBombError, DecompressionBombWarning) as exc:
            # Only the exception type goes into the audit: messages may quote file content.
            report.record_skip(relative, f"unreadable: {type(exc).__name__}")
        if progress is not None:
            progress(done, len(files))
    return report
