"""The site's de-identification policy: what is detected and how it is replaced.

The policy is the site's own configuration (a TOML or JSON file next to its data); nothing the
coordinator sends changes it. Every field has a safe default, so an empty file is a valid
policy. Unknown keys and bad values are errors that name the key, so that a typo cannot
silently weaken the policy.

Example ``deid.toml``::

    detect_faces = true         # false: images are kept as they are (no faces possible)
    face_mode = "blur"          # blur | pixelate | mask
    blur_scale = 0.25           # Gaussian sigma = blur_scale x face size (>= 0.1)
    face_margin = 0.25          # box grown by this fraction of its size on every side
    min_face_size = 32          # pixels; smaller faces are not looked for
    face_detectors = ["haar"]   # one or more of: haar, dlib-hog
    text_action = "pseudonymise"  # pseudonymise | redact
    enabled_types = ["EMAIL", "URL", "PAYMENT_CARD", "US_SSN", "IP_ADDRESS", "DATE",
                     "PHONE", "PERSON"]
    phone_regions = ["US", "GB"]
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedmm.client.deid.face_anonymisation import FaceMode
from fedmm.client.deid.face_detection import DETECTOR_REGISTRY
from fedmm.client.deid.pseudonymise import TextAction
from fedmm.client.deid.text_pii import PiiType
from fedmm.client.policy_file import PolicyError

#: Weakest blur a policy may ask for: at 0.1 a 150 px face gets sigma 15, the strength that
#: no longer matched the original identity in a check with a dlib face embedding (sigma 5
#: still matched: distance 0.58 below the 0.6 threshold).
MIN_BLUR_SCALE = 0.1


@dataclass(frozen=True)
class DeidPolicy:
    """How a site de-identifies its records before training."""

    detect_faces: bool = True
    face_mode: FaceMode = FaceMode.BLUR
    blur_scale: float = 0.25
    pixel_blocks: int = 8
    face_margin: float = 0.25
    min_face_size: int = 32
    face_detectors: tuple[str, ...] = ("haar",)
    text_action: TextAction = TextAction.PSEUDONYMISE
    enabled_types: frozenset[PiiType] = field(default_factory=lambda: frozenset(PiiType))
    phone_regions: tuple[str, ...] = ("US", "GB")

    def __post_init__(self) -> None:
        _check("detect_faces", self.detect_faces, bool)
        _check("face_mode", self.face_mode, FaceMode)
        _check("text_action", self.text_action, TextAction)
        if not MIN_BLUR_SCALE <= self.blur_scale <= 2.0:
            raise PolicyError(
                f"blur_scale: must be in [{MIN_BLUR_SCALE}, 2.0], got {self.blur_scale}"
            )
        if not 1 <= self.pixel_blocks <= 16:
            raise PolicyError(f"pixel_blocks: must be in [1, 16], got {self.pixel_blocks}")
        if not 0.0 <= self.face_margin <= 1.0:
            raise PolicyError(f"face_margin: must be in [0, 1], got {self.face_margin}")
        if not 20 <= self.min_face_size <= 1000:
            raise PolicyError(
                f"min_face_size: must be in [20, 1000] pixels, got {self.min_face_size}"
            )
        unknown = [d for d in self.face_detectors if d not in DETECTOR_REGISTRY]
        if not self.face_detectors or unknown:
            raise PolicyError(
                f"face_detectors: unknown {unknown or 'empty list'}; "
                f"known: {sorted(DETECTOR_REGISTRY)}"
            )
        for t in self.enabled_types:
            _check("enabled_types", t, PiiType)
        for region in self.phone_regions:
            if not (isinstance(region, str) and len(region) == 2 and region.isupper()):
                raise PolicyError(
                    f"phone_regions: {region!r} is not a two-letter region code like 'US'"
                )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DeidPolicy:
        """A policy from a mapping of field names to plain values (strings, numbers, lists)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"unknown policy key(s) {unknown}; known keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _convert(key, value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable values (sorted lists for sets), e.g. for the audit."""
        out = asdict(self)
        out["face_mode"] = self.face_mode.value
        out["text_action"] = self.text_action.value
        out["face_detectors"] = list(self.face_detectors)
        out["phone_regions"] = list(self.phone_regions)
        out["enabled_types"] = sorted(t.value for t in self.enabled_types)
        return out


def _check(key: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise PolicyError(f"{key}: expected a {kind.__name__}, got {value!r}")


def _enum(key: str, value: Any, kind: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise PolicyError(f"{key}: {value!r} is not one of {choices}") from None


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{key}: expected a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise PolicyError(f"{key}: expected a whole number, got {value!r}")
    return kind(value)


def _string_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{key}: expected a list of strings, got {value!r}")
    return list(value)


def _convert(key: str, value: Any) -> Any:
    if key == "detect_faces":
        if not isinstance(value, bool):
            raise PolicyError(f"{key}: expected true or false, got {value!r}")
        return value
    if key == "face_mode":
        return _enum(key, value, FaceMode)
    if key == "text_action":
        return _enum(key, value, TextAction)
    if key in ("blur_scale", "face_margin"):
        return _number(key, value, float)
    if key in ("pixel_blocks", "min_face_size"):
        return _number(key, value, int)
    if key == "enabled_types":
        return frozenset(_enum(key, v, PiiType) for v in _string_list(key, value))
    # face_detectors, phone_regions
    return tuple(_string_list(key, value))


def load_policy(path: Path) -> DeidPolicy:
    """The policy in a ``.toml`` or ``.json`` file; :class:`PolicyError` names any bad key."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise PolicyError(f"{path}: policy file must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a table of policy keys at the top level")
    try:
        return DeidPolicy.from_mapping(data)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None
