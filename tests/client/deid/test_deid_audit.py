"""The audit report: counts and versions, never a found value."""

from __future__ import annotations

import json
from pathlib import Path

from fedmm.client.deid.audit import AuditReport, tool_versions
from fedmm.client.deid.face_detection import Box
from fedmm.client.deid.imagefolder import deidentify_caption
from fedmm.client.deid.policy import DeidPolicy

SECRET = bytes(32)
CAPTION = "Maria Santos (maria.santos@example.com), SSN 123-45-6789, call (415) 555-0132."
VALUES = ["Maria", "Santos", "maria.santos@example.com", "123-45-6789", "555-0132"]


def test_counts_per_type_finder_and_detector(tmp_path: Path) -> None:
    policy = DeidPolicy()
    report = AuditReport(policy=policy.to_dict(), tool_versions=tool_versions())
    _, spans = deidentify_caption(CAPTION, policy, SECRET)
    report.record_caption(spans)
    report.record_caption([])
    report.record_image([Box(0, 0, 40, 40, "haar"), Box(50, 0, 40, 40, "dlib-hog")])
    report.record_image([])
    report.record_skip("notes.txt", "not an image or metadata.jsonl")
    data = report.to_dict()
    assert data["pii_by_type"] == {"EMAIL": 1, "PERSON": 1, "PHONE": 1, "US_SSN": 1}
    assert data["pii_by_finder"]["PHONE:phonenumbers"] == 1
    assert (data["captions_processed"], data["captions_altered"]) == (2, 1)
    assert data["faces_by_detector"] == {"dlib-hog": 1, "haar": 1}
    assert (data["images_processed"], data["images_with_faces"]) == (2, 1)
    assert data["skipped"] == [{"path": "notes.txt", "reason": "not an image or metadata.jsonl"}]
    report.write(tmp_path / "audit.json")
    written = (tmp_path / "audit.json").read_text()
    assert json.loads(written) == data
    for value in VALUES:
        assert value not in written


def test_tool_versions_name_the_detection_stack() -> None:
    versions = tool_versions({"haar-cascade": "haarcascade_frontalface_alt2.xml"})
    assert versions["opencv-python-headless"].startswith("4.")
    assert versions["phonenumbers"] != "not installed"
    assert versions["haar-cascade"] == "haarcascade_frontalface_alt2.xml"
    assert "python" in versions
