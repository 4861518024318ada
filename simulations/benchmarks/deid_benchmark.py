"""Measure the site de-identification against its targets and print JSON.

    python simulations/benchmarks/deid_benchmark.py [--detectors haar[,dlib-hog]] [--repeats N]

Faces, on images shipped in packages (scikit-image, matplotlib):

- recall on the 100 faces and false-positive rate on the 100 non-faces of
  ``skimage.data.lfw_subset()``. The crops are 25x25 and cut tight around the face, smaller
  than the 32 px minimum face and without the context any detector needs, so each crop is
  upscaled to 100x100 (bicubic) and given a 25 px replicated border (:func:`embed_lfw_crop`);
  the same treatment is applied to faces and non-faces;
- faces found on ``skimage.data.astronaut()`` and matplotlib's ``grace_hopper.jpg`` (one
  face each), and ``skimage.data.camera()`` (a small face turned away: known miss);
- milliseconds per 512x512 image (median over ``--repeats``) to detect, and to detect and
  blur.

Captions, on tests/data/pii_captions.jsonl: recall per type (a labelled span counts as found
when every character of it is inside some finding), names recall, and the share of clean
captions altered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedmm.client.deid.face_anonymisation import anonymise_faces  # noqa: E402
from fedmm.client.deid.face_detection import FaceDetector, build_face_detector  # noqa: E402
from fedmm.client.deid.text_pii import PiiType, find_pii  # noqa: E402

CAPTIONS_PATH = REPO / "tests" / "data" / "pii_captions.jsonl"

#: The targets: face recall, false positives, time per image and caption PII recall.
TARGETS = {
    "face_recall_min": 0.95,
    "face_false_positive_rate_max": 0.02,
    "ms_per_512_image_max": 100.0,
    "caption_recall_per_pattern_type_min": 0.95,
    "caption_names_recall_min": 0.85,
    "clean_captions_altered_max": 0.05,
}


def embed_lfw_crop(crop: np.ndarray, *, size: int = 100, border: int = 25) -> np.ndarray:
    """A tight 25x25 LFW crop (float in [0, 1]) as a uint8 image a detector can work on:
    upscaled to ``size`` and surrounded by a replicated border of ``border`` pixels."""
    import cv2

    gray = np.clip(np.round(crop * 255.0), 0, 255).astype(np.uint8)
    gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC)
    return cv2.copyMakeBorder(gray, border, border, border, border, cv2.BORDER_REPLICATE)


def grace_hopper() -> np.ndarray:
    """matplotlib's sample portrait of Grace Hopper, RGB uint8 (600 x 512)."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as img:
        return np.asarray(img.convert("RGB"))


def lfw_figures(detector: FaceDetector) -> dict[str, Any]:
    """Recall on the 100 LFW faces and false-positive rate on the 100 non-faces."""
    from skimage.data import lfw_subset

    crops = lfw_subset()
    found = [bool(detector.detect(embed_lfw_crop(c))) for c in crops]
    faces, non_faces = found[:100], found[100:]
    return {
        "lfw_faces_found": sum(faces),
        "lfw_faces": len(faces),
        "face_recall": sum(faces) / len(faces),
        "lfw_non_faces_flagged": sum(non_faces),
        "lfw_non_faces": len(non_faces),
        "face_false_positive_rate": sum(non_faces) / len(non_faces),
    }


def _median_ms(fn: Any, image: np.ndarray, repeats: int) -> float:
    fn(image)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(image)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def sample_image_figures(detector: FaceDetector, repeats: int) -> dict[str, Any]:
    """Faces found on the sample photos and time per 512x512 image."""
    import cv2
    from skimage.data import astronaut, camera

    images = {
        "astronaut": astronaut(),
        "grace_hopper": grace_hopper(),
        "camera": camera(),
    }
    out: dict[str, Any] = {
        f"faces_on_{name}": len(detector.detect(img)) for name, img in images.items()
    }
    square = {
        "astronaut": images["astronaut"],
        "grace_hopper": cv2.resize(images["grace_hopper"], (512, 512)),
        "camera": images["camera"],
    }

    def detect_and_blur(img: np.ndarray) -> np.ndarray:
        return anonymise_faces(img, detector.detect(img))

    detect_ms = {n: _median_ms(detector.detect, img, repeats) for n, img in square.items()}
    blur_ms = {n: _median_ms(detect_and_blur, img, repeats) for n, img in square.items()}
    out["ms_per_512_image_detect"] = {n: round(v, 1) for n, v in detect_ms.items()}
    out["ms_per_512_image_detect_and_blur"] = {n: round(v, 1) for n, v in blur_ms.items()}
    out["ms_per_512_image_max"] = round(max(blur_ms.values()), 1)
    return out


def caption_figures(path: Path = CAPTIONS_PATH) -> dict[str, Any]:
    """Recall per type, names recall and share of clean captions altered."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    labelled, found = Counter(), Counter()
    clean = altered = 0
    for record in records:
        spans = find_pii(record["text"])
        covered = set()
        for span in spans:
            covered.update(range(span.start, span.end))
        if record["clean"]:
            clean += 1
            altered += bool(spans)
        for entity in record["entities"]:
            labelled[entity["type"]] += 1
            found[entity["type"]] += set(range(entity["start"], entity["end"])) <= covered
    recall = {t: found[t] / labelled[t] for t in sorted(labelled)}
    patterns = [t for t in recall if t != PiiType.PERSON.value]
    return {
        "captions": len(records),
        "labelled_spans_per_type": dict(sorted(labelled.items())),
        "caption_recall_per_type": {t: round(r, 4) for t, r in recall.items()},
        "caption_min_pattern_recall": round(min(recall[t] for t in patterns), 4),
        "names_recall": round(recall[PiiType.PERSON.value], 4),
        "clean_captions": clean,
        "clean_captions_altered": altered,
        "clean_altered_share": round(altered / clean, 4),
    }


def run(detector_names: list[str], repeats: int, min_face_size: int) -> dict[str, Any]:
    """All figures, the targets and whether each is met."""
    detector = build_face_detector(detector_names, min_face_size=min_face_size)
    faces = {"detector": detector.name, "min_face_size": min_face_size}
    faces |= lfw_figures(detector) | sample_image_figures(detector, repeats)
    captions = caption_figures()
    met = {
        "face_recall": faces["face_recall"] >= TARGETS["face_recall_min"],
        "face_false_positive_rate": faces["face_false_positive_rate"]
        <= TARGETS["face_false_positive_rate_max"],
        "ms_per_512_image": faces["ms_per_512_image_max"] <= TARGETS["ms_per_512_image_max"],
        "caption_pattern_recall": captions["caption_min_pattern_recall"]
        >= TARGETS["caption_recall_per_pattern_type_min"],
        "names_recall": captions["names_recall"] >= TARGETS["caption_names_recall_min"],
        "clean_altered": captions["clean_altered_share"] <= TARGETS["clean_captions_altered_max"],
    }
    return {"faces": faces, "captions": captions, "targets": TARGETS, "targets_met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default="haar", help="comma-separated: haar,dlib-hog")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--min-face-size", type=int, default=32)
    args = parser.parse_args(argv)
    result = run(args.detectors.split(","), args.repeats, args.min_face_size)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
