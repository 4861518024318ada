"""Face anonymisation modes, checked on real portraits with a real detector."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from fedmm.client.deid.face_anonymisation import (
    MIN_BLUR_SIGMA,
    FaceMode,
    anonymise_faces,
    blur_sigma_for,
)
from fedmm.client.deid.face_detection import Box, DlibHogDetector, HaarCascadeDetector
from fedmm.simulations.benchmarks.deid_benchmark import grace_hopper


def test_blur_sigma_scales_with_face_size_and_has_a_floor() -> None:
    assert blur_sigma_for(Box(0, 0, 200, 180), 0.25) == 50.0
    assert blur_sigma_for(Box(0, 0, 20, 20), 0.25) == MIN_BLUR_SIGMA
    with pytest.raises(ValueError, match="blur_scale"):
        blur_sigma_for(Box(0, 0, 20, 20), 0.0)


@pytest.mark.parametrize("mode", list(FaceMode))
def test_each_mode_defeats_both_detectors_and_leaves_the_rest(mode: FaceMode) -> None:
    haar, hog = HaarCascadeDetector(), DlibHogDetector()
    for image in (astronaut(), grace_hopper()):
        original = image.copy()
        boxes = haar.detect(image)
        assert boxes
        out = anonymise_faces(image, boxes, mode=mode, margin=0.25)
        assert np.array_equal(image, original), "input must not be modified"
        assert haar.detect(out) == []
        assert hog.detect(out) == []
        area = boxes[0].expanded(0.25, *image.shape[:2])
        outside = np.ones(image.shape[:2], bool)
        outside[area.y : area.y + area.height, area.x : area.x + area.width] = False
        assert np.array_equal(out[outside], image[outside])


def test_blur_removes_fine_detail_inside_the_face() -> None:
    image = grace_hopper()
    (box,) = HaarCascadeDetector().detect(image)
    out = anonymise_faces(image, [box], mode=FaceMode.BLUR, margin=0.0)
    rows = slice(box.y, box.y + box.height)
    cols = slice(box.x, box.x + box.width)

    def detail(img: np.ndarray) -> float:
        grey = img[rows, cols].astype(float).mean(axis=2)
        return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())

    assert detail(out) < 0.1 * detail(image)


def test_mask_fills_the_expanded_box_with_the_mask_value() -> None:
    image = np.full((100, 100, 3), 200, np.uint8)
    out = anonymise_faces(image, [Box(40, 40, 20, 20)], mode=FaceMode.MASK, margin=0.5)
    assert (out[30:70, 30:70] == 0).all()
    assert (out[:30] == 200).all()


def test_pixelate_leaves_at_most_blocks_by_blocks_colours() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    out = anonymise_faces(image, [Box(0, 0, 64, 64)], mode="pixelate", margin=0, pixel_blocks=8)
    assert len(np.unique(out)) <= 64
    assert np.array_equal(out[0:8, 0:8], np.full((8, 8), out[0, 0]))
