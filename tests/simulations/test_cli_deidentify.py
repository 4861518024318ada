"""``fedmm deidentify SRC DST``: a real imagefolder with a face and personal data, run through
the command's ``main`` in this process (real detector, real secret file)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.data import astronaut
from skimage.transform import resize

from fedmm.simulations.cli import main

PII = ["Eileen", "Collins", "eileen@example.com", "(415) 555-0134", "1999-07-23"]


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "scans").mkdir(parents=True)
    face = (resize(astronaut(), (256, 256), anti_aliasing=True) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x013B] = "Eileen Collins"  # Artist: dropped with the metadata
    Image.fromarray(face).save(root / "astronaut.jpg", exif=exif)
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(root / "scans" / "grey.png")
    (root / "notes.txt").write_text("Eileen Collins' notes")
    lines = [
        {"file_name": "astronaut.jpg", "text": "Eileen Collins on 1999-07-23, eileen@example.com"},
        {"file_name": "scans/grey.png", "text": "a grey square, call (415) 555-0134"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(*args: object) -> int:
    return main(["deidentify", *map(str, args), "--quiet"])


def test_output_is_de_identified_audited_and_byte_identical_when_run_again(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "keys" / "site-secret"
    assert _run(src, tmp_path / "a", "--secret", secret) == 0
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    first = _tree(tmp_path / "a")
    assert sorted(first) == ["astronaut.jpg", "audit.json", "metadata.jsonl", "scans/grey.png"]
    for name, content in first.items():
        assert not any(value.encode() in content for value in PII), name
    audit = json.loads(first["audit.json"])
    assert audit["faces_by_detector"] == {"haar": 1}
    assert audit["pii_by_type"] == {"DATE": 1, "EMAIL": 1, "PERSON": 1, "PHONE": 1}
    assert audit["skipped"] == [{"path": "notes.txt", "reason": "not an image or metadata.jsonl"}]
    assert audit["policy"]["text_action"] == "pseudonymise"
    assert "opencv-python-headless" in audit["tool_versions"]

    # Again over its own earlier output, this time with the progress bar and summary.
    assert main(["deidentify", str(src), str(tmp_path / "a"), "--secret", str(secret)]) == 0
    out = capsys.readouterr()
    assert "de-identifying" in out.err and "4/4" in out.err
    assert "captions altered" in out.out and "faces found by haar" in out.out
    assert _run(src, tmp_path / "b", "--secret", secret) == 0
    assert _tree(tmp_path / "a") == first
    assert _tree(tmp_path / "b") == first


def test_the_site_secret_is_created_at_the_default_location(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    policy = tmp_path / "deid.toml"
    policy.write_text('text_action = "redact"\ndetect_faces = false\n')
    assert _run(src, tmp_path / "out", "--policy", policy) == 0
    secret = tmp_path / "config" / "fedmm" / "site-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    lines = (tmp_path / "out" / "metadata.jsonl").read_text()
    assert "<PERSON> on <DATE>, <EMAIL>" in lines
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["images_with_faces"] == 0


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_src", "SRC {src}-missing does not exist"),
        ("dst_inside_src", "is SRC or inside it"),
        ("dst_not_empty", "is not empty and is not an earlier output"),
        ("bad_policy_key", "unknown policy key(s) ['blur_scal']"),
        ("missing_policy", "policy file {tmp}/none.toml does not exist"),
        ("bad_policy_value", "detect_faces: expected true or false"),
        ("readable_secret", "readable by group or others"),
    ],
)
def test_bad_inputs_exit_2_naming_the_input_and_the_fix(
    case: str, expected: str, src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst, secret = tmp_path / "out", tmp_path / "secret"
    args: list[object] = [src, dst, "--secret", secret]
    if case == "missing_src":
        args[0] = f"{src}-missing"
    elif case == "dst_inside_src":
        args[1] = dst = src / "out"
    elif case == "dst_not_empty":
        dst.mkdir()
        (dst / "thesis.pdf").write_bytes(b"%PDF")
    elif case in ("bad_policy_key", "bad_policy_value"):
        policy = tmp_path / "deid.toml"
        policy.write_text(
            "blur_scal = 0.3\n" if case == "bad_policy_key" else 'detect_faces = "no"'
        )
        args += ["--policy", policy]
    elif case == "missing_policy":
        args += ["--policy", tmp_path / "none.toml"]
    elif case == "readable_secret":
        secret.write_bytes(bytes(32))
        secret.chmod(0o644)
    assert _run(*args) == 2
    err = capsys.readouterr().err
    assert expected.format(src=src, tmp=tmp_path) in err
    assert err.startswith("fedmm deidentify: ")
    if case == "dst_not_empty":
        assert _tree(dst) == {"thesis.pdf": b"%PDF"}  # untouched
    else:
        assert not dst.exists()
