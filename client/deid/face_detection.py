"""Face detectors behind one small interface, so that a site can swap or combine them.

Every detector takes an image as a numpy array (H x W grey, H x W x 3 RGB or H x W x 4 RGBA;
uint8, or float in [0, 1]) and returns the faces it found as :class:`Box` objects in pixel
coordinates of that image.

Detectors shipped here (all offline, weights inside registry wheels):

- ``"haar"``: OpenCV's ``haarcascade_frontalface_alt2`` cascade, from
  ``opencv-python-headless==4.14.0.94`` (OpenCV 5 dropped the cascades). The default: 98/100
  faces and 0/100 non-faces on ``skimage.data.lfw_subset()``, about 50-75 ms per 512x512 image
  on two cores (see docs/deidentification.md for the command).
- ``"dlib-hog"``: dlib's HOG + linear SVM frontal detector, from ``dlib-bin``. Faster (about
  25 ms) but finds only faces of about 80 px and more without upsampling.

:class:`UnionDetector` combines detectors (a face found by any of them is kept; overlapping
boxes are merged), which raises recall at the cost of time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Protocol, runtime_checkable

import numpy as np

#: The cascade used by :class:`HaarCascadeDetector` unless told otherwise. Measured better than
#: ``frontalface_default`` and ``frontalface_alt`` on lfw_subset (98 vs 97 and 98 faces, no false
#: positives) and faster than ``default``.
DEFAULT_HAAR_CASCADE = "haarcascade_frontalface_alt2.xml"

#: Side in pixels of the Haar cascade's own detection window: faces smaller than this are never
#: found, whatever the image scale.
_HAAR_WINDOW = 20


@dataclass(frozen=True)
class Box:
    """An axis-aligned face box in pixel coordinates, with the detector that found it."""

    x: int
    y: int
    width: int
    height: int
    detector: str = ""

    @property
    def side(self) -> int:
        """The longer side of the box, the face size used for scaling blur and size limits."""
        return max(self.width, self.height)

    def clipped(self, image_height: int, image_width: int) -> Box:
        """This box cut to the image bounds (a box may lie partly outside the image)."""
        x0, y0 = max(0, self.x), max(0, self.y)
        x1 = min(image_width, self.x + self.width)
        y1 = min(image_height, self.y + self.height)
        return replace(self, x=x0, y=y0, width=max(0, x1 - x0), height=max(0, y1 - y0))

    def expanded(self, margin: float, image_height: int, image_width: int) -> Box:
        """This box grown by ``margin`` times its size on every side, clipped to the image."""
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        dx, dy = round(self.width * margin), round(self.height * margin)
        grown = replace(
            self,
            x=self.x - dx,
            y=self.y - dy,
            width=self.width + 2 * dx,
            height=self.height + 2 * dy,
        )
        return grown.clipped(image_height, image_width)

    def iou(self, other: Box) -> float:
        """Intersection over union of two boxes (0 when they do not overlap)."""
        ix = max(0, min(self.x + self.width, other.x + other.width) - max(self.x, other.x))
        iy = max(0, min(self.y + self.height, other.y + other.height) - max(self.y, other.y))
        inter = ix * iy
        union = self.width * self.height + other.width * other.height - inter
        return inter / union if union > 0 else 0.0


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that finds faces in an image."""

    #: Short stable name, used in the audit report (e.g. ``"haar"``).
    name: str

    def detect(self, image: np.ndarray) -> list[Box]:
        """Boxes of the faces found in ``image``."""
        ...

    def versions(self) -> dict[str, str]:
        """Versions of the packages and model files this detector relies on, for the audit."""
        ...


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """``image`` as a contiguous 8-bit greyscale array (the input both detectors want)."""
    import cv2

    if image.ndim not in (2, 3):
        raise ValueError(f"expected an H x W or H x W x C image, got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        else:
            # 16-bit scans and the like: stretch the used range onto 8 bits.
            peak = max(int(image.max()), 1) if image.size else 1
            scale = 255.0 / peak if peak > 255 else 1.0
            image = np.clip(np.round(image * scale), 0, 255).astype(np.uint8)
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        elif channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
        else:
            raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")
    return np.ascontiguousarray(image)


def _package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


class HaarCascadeDetector:
    """OpenCV Viola-Jones frontal face cascade.

    For speed the image is downscaled so that ``min_face_size`` maps onto the cascade's 20 px
    window: a larger minimum face size makes detection faster, never slower.
    """

    name = "haar"

    def __init__(
        self,
        *,
        min_face_size: int = 32,
        scale_factor: float = 1.15,
        min_neighbors: int = 3,
        cascade: str = DEFAULT_HAAR_CASCADE,
    ) -> None:
        import cv2

        if min_face_size < _HAAR_WINDOW:
            raise ValueError(f"min_face_size must be >= {_HAAR_WINDOW} px, got {min_face_size}")
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise RuntimeError(
                "this OpenCV build has no Haar cascades (OpenCV 5 dropped them): "
                "install opencv-python-headless==4.14.0.94"
            )
        path = cv2.data.haarcascades + cascade
        self._classifier = cv2.CascadeClassifier(path)
        if self._classifier.empty():
            raise RuntimeError(f"could not load the Haar cascade {path}")
        self._cascade = cascade
        self.min_face_size = min_face_size
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors

    def detect(self, image: np.ndarray) -> list[Box]:
        """Frontal faces of at least ``min_face_size`` pixels in ``image``."""
        import cv2

        gray = to_gray_uint8(image)
        shrink = min(1.0, _HAAR_WINDOW / self.min_face_size)
        if shrink < 1.0:
            gray = cv2.resize(gray, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        found = self._classifier.detectMultiScale(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(_HAAR_WINDOW, _HAAR_WINDOW),
        )
        return [
            Box(
                x=round(x / shrink),
                y=round(y / shrink),
                width=round(w / shrink),
                height=round(h / shrink),
                detector=self.name,
            )
            for (x, y, w, h) in found
        ]

    def versions(self) -> dict[str, str]:
        """The OpenCV package and the cascade file used."""
        return {
            "opencv-python-headless": _package_version("opencv-python-headless"),
            "haar-cascade": self._cascade,
        }


class DlibHogDetector:
    """dlib's HOG frontal face detector (``dlib-bin``); finds faces of about 80 px and up
    at ``upsample=0``, each upsampling step halves that and costs about 4x the time."""

    name = "dlib-hog"

    def __init__(self, *, min_face_size: int = 32, upsample: int = 0) -> None:
        import dlib

        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        self._detector = dlib.get_frontal_face_detector()
        self.min_face_size = min_face_size
        self.upsample = upsample

    def detect(self, image: np.ndarray) -> list[Box]:
        """Frontal faces in ``image`` of at least ``min_face_size`` pixels."""
        gray = to_gray_uint8(image)
        height, width = gray.shape
        boxes = []
        for rect in self._detector(gray, self.upsample):
            box = Box(
                x=rect.left(),
                y=rect.top(),
                width=rect.width(),
                height=rect.height(),
                detector=self.name,
            ).clipped(height, width)
            if box.side >= self.min_face_size:
                boxes.append(box)
        return boxes

    def versions(self) -> dict[str, str]:
        """The dlib package used."""
        return {"dlib-bin": _package_version("dlib-bin")}


class UnionDetector:
    """Faces found by any of several detectors; boxes overlapping by more than
    ``merge_iou`` are merged into their enclosing box, credited to the first detector."""

    def __init__(self, detectors: Sequence[FaceDetector], *, merge_iou: float = 0.3) -> None:
        if not detectors:
            raise ValueError("UnionDetector needs at least one detector")
        self.detectors = list(detectors)
        self.merge_iou = merge_iou
        self.name = "+".join(d.name for d in self.detectors)

    def detect(self, image: np.ndarray) -> list[Box]:
        """Merged boxes of all detectors, each keeping the name of the detector that found it
        first."""
        merged: list[Box] = []
        for detector in self.detectors:
            for box in detector.detect(image):
                for i, kept in enumerate(merged):
                    if kept.iou(box) > self.merge_iou:
                        merged[i] = _enclosing(kept, box)
                        break
                else:
                    merged.append(box)
        return merged

    def versions(self) -> dict[str, str]:
        """Versions of every combined detector."""
        out: dict[str, str] = {}
        for detector in self.detectors:
            out.update(detector.versions())
        return out


def _enclosing(first: Box, second: Box) -> Box:
    x0, y0 = min(first.x, second.x), min(first.y, second.y)
    x1 = max(first.x + first.width, second.x + second.width)
    y1 = max(first.y + first.height, second.y + second.height)
    return replace(first, x=x0, y=y0, width=x1 - x0, height=y1 - y0)


#: Detector constructors by the name a site policy uses.
DETECTOR_REGISTRY: dict[str, Callable[..., FaceDetector]] = {
    HaarCascadeDetector.name: HaarCascadeDetector,
    DlibHogDetector.name: DlibHogDetector,
}


def build_face_detector(names: Sequence[str], *, min_face_size: int) -> FaceDetector:
    """The detector named in a policy: one of :data:`DETECTOR_REGISTRY`, or the union of
    several when more than one name is given."""
    unknown = [n for n in names if n not in DETECTOR_REGISTRY]
    if unknown or not names:
        raise ValueError(
            f"unknown face detector(s) {unknown or names!r}; known: {sorted(DETECTOR_REGISTRY)}"
        )
    detectors = [DETECTOR_REGISTRY[n](min_face_size=min_face_size) for n in names]
    return detectors[0] if len(detectors) == 1 else UnionDetector(detectors)
