"""The site policy: defaults, files, and errors that name the bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmm.client.deid.face_anonymisation import FaceMode
from fedmm.client.deid.policy import DeidPolicy, PolicyError, load_policy
from fedmm.client.deid.pseudonymise import TextAction
from fedmm.client.deid.text_pii import PiiType


def test_defaults_are_the_safe_choice() -> None:
    policy = DeidPolicy()
    assert policy.face_mode is FaceMode.BLUR
    assert policy.text_action is TextAction.PSEUDONYMISE
    assert policy.enabled_types == frozenset(PiiType)
    assert policy.face_detectors == ("haar",)


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "deid.toml"
    path.write_text(
        'face_mode = "pixelate"\nmin_face_size = 48\ntext_action = "redact"\n'
        'enabled_types = ["EMAIL", "PERSON"]\nface_detectors = ["haar", "dlib-hog"]\n'
    )
    policy = load_policy(path)
    assert policy.face_mode is FaceMode.PIXELATE
    assert policy.min_face_size == 48
    assert policy.text_action is TextAction.REDACT
    assert policy.enabled_types == {PiiType.EMAIL, PiiType.PERSON}
    assert policy.face_detectors == ("haar", "dlib-hog")


def test_load_json_and_round_trip_through_to_dict(tmp_path: Path) -> None:
    path = tmp_path / "deid.json"
    original = DeidPolicy(face_mode=FaceMode.MASK, blur_scale=0.5, phone_regions=("DE",))
    path.write_text(json.dumps(original.to_dict()))
    assert load_policy(path) == original


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("blur_scal = 0.3", r"unknown policy key\(s\) \['blur_scal'\]"),
        ('face_mode = "smudge"', "face_mode: 'smudge' is not one of blur, pixelate, mask"),
        ("blur_scale = 0.01", r"blur_scale: must be in \[0.1, 2.0\]"),
        ('min_face_size = "big"', "min_face_size: expected a number"),
        ("min_face_size = 32.5", "min_face_size: expected a whole number"),
        ('enabled_types = ["EMAIL", "PASSPORT"]', "enabled_types: 'PASSPORT' is not one of"),
        ('face_detectors = ["mtcnn"]', r"face_detectors: unknown \['mtcnn'\]"),
        ('phone_regions = ["usa"]', "phone_regions: 'usa' is not a two-letter region"),
        ("face_margin = true", "face_margin: expected a number"),
        ("min_face_size = ", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "deid.toml"
    path.write_text(content + "\n")
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


def test_other_suffixes_and_non_tables_are_rejected(tmp_path: Path) -> None:
    yaml = tmp_path / "deid.yaml"
    yaml.write_text("face_mode: blur\n")
    with pytest.raises(PolicyError, match=r"\.toml or \.json"):
        load_policy(yaml)
    listing = tmp_path / "deid.json"
    listing.write_text("[1, 2]")
    with pytest.raises(PolicyError, match="top level"):
        load_policy(listing)
