"""What ``fedmm deidentify SRC DST`` does, as a plain function: check the inputs, resolve the
policy and the site secret, de-identify SRC into a temporary folder beside DST and move it
into place with its ``audit.json``.

Every problem a user can fix is a :class:`DeidentifyError` whose message names the bad
input and the fix; nothing is written to DST then. DST is replaced only when it is new,
empty, or an earlier output of this command (it holds ``audit.json``), so a mistyped DST
cannot wipe an unrelated folder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedmm.client.deid.audit import AuditReport
from fedmm.client.deid.imagefolder import (
    IMAGE_SUFFIXES,
    METADATA_NAME,
    ProgressCallback,
    deidentify_imagefolder,
)
from fedmm.client.deid.policy import DeidPolicy, PolicyError, load_policy

AUDIT_FILE = "audit.json"


class DeidentifyError(ValueError):
    """An input of ``fedmm deidentify`` is unusable; the message says which and how to fix it."""


def _check_folders(src: Path, dst: Path) -> None:
    if not src.exists():
        raise DeidentifyError(
            f"SRC {src} does not exist: pass the folder that holds your images and {METADATA_NAME}"
        )
    if not src.is_dir():
        raise DeidentifyError(
            f"SRC {src} is not a folder: pass the folder that holds your images and "
            f"{METADATA_NAME}, not a file in it"
        )
    usable = any(
        p.is_file() and (p.name == METADATA_NAME or p.suffix.lower() in IMAGE_SUFFIXES)
        for p in src.rglob("*")
    )
    if not usable:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DeidentifyError(
            f"SRC {src} holds no images ({kinds}) and no {METADATA_NAME}: is it the right folder?"
        )
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise DeidentifyError(
            f"DST {dst} is SRC or inside it: choose a folder outside SRC, e.g. {src_r}-deid"
        )
    if dst_r in src_r.parents:
        raise DeidentifyError(
            f"SRC {src} is inside DST {dst}: DST would be replaced; choose a new folder"
        )
    if dst.exists() and not dst.is_dir():
        raise DeidentifyError(f"DST {dst} exists and is not a folder: choose a new folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / AUDIT_FILE).is_file():
        raise DeidentifyError(
            f"DST {dst} is not empty and is not an earlier output of fedmm deidentify (it has "
            f"no {AUDIT_FILE}): choose a new or empty folder; nothing was written"
        )


def _load_policy(path: Path | None) -> DeidPolicy:
    if path is None:
        return DeidPolicy()
    if not Path(path).is_file():
        raise DeidentifyError(
            f"policy file {path} does not exist: pass --policy with a .toml or .json file "
            "(docs/deidentification.md shows one), or leave --policy out for the defaults"
        )
    try:
        return load_policy(path)
    except PolicyError as err:
        raise DeidentifyError(f"bad policy: {err}; fix that key in the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DeidentifyError(
            f"policy file {path} cannot be read ({type(err).__name__}): check that it is a "
            "readable UTF-8 text file"
        ) from None


def _load_secret(path: Path) -> tuple[bytes, bool]:
    from fedmm.client.deid.site_secret import SiteSecretError, load_or_create_site_secret

    existed = path.exists()
    if existed and not path.is_file():
        raise DeidentifyError(f"site secret {path} is not a file: pass --secret FILE")
    try:
        return load_or_create_site_secret(path), not existed
    except SiteSecretError as err:
        raise DeidentifyError(
            f"{err}. Fix the file or pass another one with --secret (a new file is created)"
        ) from None
    except OSError as err:
        raise DeidentifyError(
            f"site secret {path} cannot be read or created ({type(err).__name__}): pass "
            "--secret with a path in a folder you can write"
        ) from None


@dataclass(frozen=True)
class DeidentifyInputs:
    """Checked inputs of one run: the folders, the policy and the site secret."""

    src: Path
    dst: Path
    policy: DeidPolicy
    secret: bytes = field(repr=False)
    secret_file: Path
    secret_created: bool


def check_inputs(
    src: Path, dst: Path, *, policy_file: Path | None, secret_file: Path
) -> DeidentifyInputs:
    """The checked inputs of a run, or :class:`DeidentifyError` naming the bad one. Creates
    the site secret if it does not exist yet (and only once every other input is fine)."""
    src, dst, secret_file = Path(src), Path(dst), Path(secret_file)
    _check_folders(src, dst)
    policy = _load_policy(policy_file)
    try:
        import cv2  # noqa: F401
        import phonenumbers  # noqa: F401
    except ImportError as err:
        raise DeidentifyError(
            f"de-identification needs the deid extra ({err.name} is missing): "
            "reinstall fedmm: its dependencies include the de-identification tools"
        ) from None
    secret, created = _load_secret(secret_file)
    return DeidentifyInputs(src, dst, policy, secret, secret_file, created)


def deidentify_to_folder(
    inputs: DeidentifyInputs, *, progress: ProgressCallback | None = None
) -> AuditReport:
    """De-identify ``inputs.src`` into ``inputs.dst`` with ``audit.json``; the report."""
    dst = inputs.dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        report = deidentify_imagefolder(
            inputs.src, work, inputs.policy, inputs.secret, progress=progress
        )
        work.mkdir(exist_ok=True)  # a source with nothing usable still gets its audit
        report.write(work / AUDIT_FILE)
        _replace_folder(dst, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _replace_folder(dst: Path, new: Path) -> None:
    """Put ``new`` at ``dst``; an earlier output there is removed only once ``new`` is in."""
    if not dst.exists():
        new.rename(dst)
        return
    old = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
    dst.rename(old)
    try:
        new.rename(dst)
    except OSError:
        old.rename(dst)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
