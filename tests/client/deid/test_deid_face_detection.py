"""Face detectors, run for real on faces shipped in scikit-image and matplotlib."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut, camera, lfw_subset

from fedmm.client.deid.face_detection import (
    Box,
    DlibHogDetector,
    FaceDetector,
    HaarCascadeDetector,
    UnionDetector,
    build_face_detector,
    to_gray_uint8,
)
from fedmm.simulations.benchmarks.deid_benchmark import embed_lfw_crop, grace_hopper

# Where the faces are (x0, y0, x1, y1), checked by eye on the sample images.
ASTRONAUT_FACE = (170, 60, 280, 170)
GRACE_HOPPER_FACE = (140, 80, 390, 350)


def _centre_inside(box: Box, region: tuple[int, int, int, int]) -> bool:
    cx, cy = box.x + box.width / 2, box.y + box.height / 2
    x0, y0, x1, y1 = region
    return x0 <= cx <= x1 and y0 <= cy <= y1


@pytest.fixture(scope="module")
def haar() -> HaarCascadeDetector:
    return HaarCascadeDetector()


def test_box_expanded_grows_each_side_and_clips_to_image() -> None:
    box = Box(x=10, y=20, width=40, height=20, detector="t")
    grown = box.expanded(0.25, image_height=100, image_width=100)
    assert (grown.x, grown.y, grown.width, grown.height) == (0, 15, 60, 30)
    assert grown.detector == "t"
    assert Box(90, 90, 20, 20).clipped(100, 100) == Box(90, 90, 10, 10)
    with pytest.raises(ValueError, match="margin"):
        box.expanded(-0.1, 100, 100)


def test_box_iou() -> None:
    a = Box(0, 0, 10, 10)
    assert a.iou(a) == 1.0
    assert a.iou(Box(20, 20, 5, 5)) == 0.0
    assert a.iou(Box(5, 0, 10, 10)) == pytest.approx(50 / 150)


def test_haar_finds_the_one_face_on_sample_portraits(haar: HaarCascadeDetector) -> None:
    for image, region in ((astronaut(), ASTRONAUT_FACE), (grace_hopper(), GRACE_HOPPER_FACE)):
        boxes = haar.detect(image)
        assert len(boxes) == 1
        assert _centre_inside(boxes[0], region)
        assert boxes[0].detector == "haar"


def test_haar_meets_lfw_recall_and_false_positive_targets(haar: HaarCascadeDetector) -> None:
    crops = lfw_subset()
    found = [bool(haar.detect(embed_lfw_crop(c))) for c in crops]
    assert sum(found[:100]) >= 95
    assert sum(found[100:]) <= 2


def test_haar_finds_nothing_on_blank_and_noise_images(haar: HaarCascadeDetector) -> None:
    rng = np.random.default_rng(0)
    assert haar.detect(np.full((256, 256, 3), 128, np.uint8)) == []
    assert haar.detect(rng.integers(0, 256, (256, 256), dtype=np.uint8)) == []


def test_faces_below_min_face_size_are_not_looked_for() -> None:
    import cv2

    small = cv2.resize(astronaut(), (128, 128))  # face of about 25 px
    assert HaarCascadeDetector(min_face_size=64).detect(small) == []
    with pytest.raises(ValueError, match="min_face_size"):
        HaarCascadeDetector(min_face_size=10)


def test_detectors_accept_grey_float_and_rgba_images(haar: HaarCascadeDetector) -> None:
    rgb = astronaut()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    for image in (to_gray_uint8(rgb), rgb / 255.0, rgba):
        assert len(haar.detect(image)) == 1
    with pytest.raises(ValueError, match="channels"):
        to_gray_uint8(np.zeros((8, 8, 2), np.uint8))


def test_dlib_hog_finds_the_astronaut() -> None:
    boxes = DlibHogDetector().detect(astronaut())
    assert len(boxes) == 1
    assert _centre_inside(boxes[0], ASTRONAUT_FACE)
    assert boxes[0].detector == "dlib-hog"


def test_union_merges_overlapping_boxes_and_credits_the_first_detector() -> None:
    union = UnionDetector([HaarCascadeDetector(), DlibHogDetector()])
    boxes = union.detect(astronaut())
    assert len(boxes) == 1
    assert boxes[0].detector == "haar"
    assert union.name == "haar+dlib-hog"
    assert set(union.versions()) >= {"opencv-python-headless", "dlib-bin"}


def test_known_miss_camera_man_is_documented(haar: HaarCascadeDetector) -> None:
    # The cameraman's face is small and turned: a frontal cascade misses it (see docs).
    assert haar.detect(camera()) == []


def test_build_face_detector_by_policy_names() -> None:
    assert isinstance(build_face_detector(["haar"], min_face_size=32), HaarCascadeDetector)
    union = build_face_detector(["haar", "dlib-hog"], min_face_size=40)
    assert isinstance(union, UnionDetector)
    assert isinstance(union, FaceDetector)
    with pytest.raises(ValueError, match="unknown face detector"):
        build_face_detector(["mtcnn"], min_face_size=32)


@pytest.mark.slow
def test_haar_detect_and_blur_under_100_ms_per_512_image() -> None:
    from fedmm.simulations.benchmarks.deid_benchmark import sample_image_figures

    figures = sample_image_figures(HaarCascadeDetector(), repeats=10)
    assert figures["ms_per_512_image_max"] <= 100.0
