"""De-identification at the site: faces in images and personal data in captions are
removed under the site's own policy before its training sees a record.

Plain functions, no Flower: the ClientApp and the ``fedmm deidentify`` command call these.
"""

from fedmm.client.deid.audit import AuditReport
from fedmm.client.deid.face_anonymisation import FaceMode, anonymise_faces
from fedmm.client.deid.face_detection import (
    Box,
    DlibHogDetector,
    FaceDetector,
    HaarCascadeDetector,
    UnionDetector,
    build_face_detector,
)
from fedmm.client.deid.imagefolder import (
    deidentify_caption,
    deidentify_image,
    deidentify_imagefolder,
)
from fedmm.client.deid.policy import DeidPolicy, PolicyError, load_policy
from fedmm.client.deid.pseudonymise import TextAction, pseudonym_for, redaction_token, replace_spans
from fedmm.client.deid.site_secret import load_or_create_site_secret
from fedmm.client.deid.text_pii import PiiSpan, PiiType, find_pii

__all__ = [
    "AuditReport",
    "Box",
    "DeidPolicy",
    "DlibHogDetector",
    "FaceDetector",
    "FaceMode",
    "HaarCascadeDetector",
    "PiiSpan",
    "PiiType",
    "PolicyError",
    "TextAction",
    "UnionDetector",
    "anonymise_faces",
    "build_face_detector",
    "deidentify_caption",
    "deidentify_image",
    "deidentify_imagefolder",
    "find_pii",
    "load_or_create_site_secret",
    "load_policy",
    "pseudonym_for",
    "redaction_token",
    "replace_spans",
]
