"""De-identify records already in memory (an :class:`ImageTextDataset`), e.g. a simulated
site's partition of the built-in benchmark.

A site's own imagefolder is de-identified file by file at full resolution instead
(:func:`client.deid.imagefolder.deidentify_imagefolder`): faces must be found before the
images are scaled down to the model's input size.
"""

from __future__ import annotations

from fedmm.client.deid.audit import AuditReport, tool_versions
from fedmm.client.deid.face_detection import FaceDetector, build_face_detector
from fedmm.client.deid.imagefolder import deidentify_caption, deidentify_image
from fedmm.client.deid.policy import DeidPolicy
from fedmm.common.data.dataset import ImageTextDataset


def deidentify_records(
    data: ImageTextDataset,
    policy: DeidPolicy,
    secret: bytes,
    *,
    detector: FaceDetector | None = None,
) -> tuple[ImageTextDataset, AuditReport]:
    """``data`` with every caption de-identified and, when ``policy.detect_faces``, every
    image's faces anonymised; labels unchanged. The audit holds counts only."""
    if detector is None:
        detector = build_face_detector(policy.face_detectors, min_face_size=policy.min_face_size)
    report = AuditReport(policy=policy.to_dict(), tool_versions=tool_versions(detector.versions()))
    captions = []
    for caption in data.captions:
        clean, spans = deidentify_caption(caption, policy, secret)
        report.record_caption(spans)
        captions.append(clean)
    images = data.images
    if policy.detect_faces:
        images = data.images.copy()
        for i, image in enumerate(data.images):
            images[i], boxes = deidentify_image(image, policy, detector)
            report.record_image(boxes)
    return ImageTextDataset(images=images, captions=captions, labels=data.labels.copy()), report
