"""The release pin: what the digest is, who computes the same value, and what a site runner
answers for an app that is not the pinned release (a code only)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from fedmm.client.release_pin import ReleasePin, check_run_app, installed_release, pin_problems
from fedmm.client.site_runner import error_reply, refusal_reply
from fedmm.common.release_identity import ReleaseError, fab_digest, normalise_digest, release_fab
from fedmm.common.site_refusal import RefusalCode, refusal_code_of, status_payload


def test_the_digest_is_the_sha256_of_the_fab_flwr_run_builds_and_is_reproducible() -> None:
    release = installed_release()
    fab = release_fab(release.directory)  # flwr.cli.build.build_fab_from_disk, as flwr run
    assert release.digest == "sha256:" + hashlib.sha256(fab).hexdigest()
    rebuilt = release_fab.__wrapped__(release.directory)  # a second build, not the cached one
    assert fab_digest(rebuilt) == release.digest  # deterministic
    assert release.fab_id == "fedmm/fedmm" and release.version
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        names = bundle.namelist()
    assert "client/app.py" in names and "client/site_runner.py" in names
    assert not any("__pycache__" in n or n.startswith(".venv/") for n in names)


def test_digest_text_is_checked_and_normalised() -> None:
    hex_digest = "AB" * 32
    assert normalise_digest(f"sha256:{hex_digest}") == f"sha256:{hex_digest.lower()}"
    assert normalise_digest(hex_digest) == f"sha256:{hex_digest.lower()}"  # sha256sum output
    for bad in ("sha256:abc", "md5:" + "a" * 32, "", "sha256:" + "g" * 64):
        with pytest.raises(ReleaseError, match="fedmm site release-digest"):
            normalise_digest(bad)


def test_only_the_pinned_bytes_are_accepted_whatever_the_name_and_version_say() -> None:
    genuine = b"PK genuine fab bytes"
    pin = ReleasePin("0.1.0", fab_digest(genuine))
    assert (
        check_run_app(pin=pin, fab_content=genuine, fab_id="fedmm/fedmm", fab_version="0.1.0")
        is None
    )
    refusal = check_run_app(
        pin=pin, fab_content=genuine + b" ", fab_id="fedmm/fedmm", fab_version="0.1.0"
    )
    assert refusal is not None and refusal.code is RefusalCode.UNTRUSTED_APP
    assert fab_digest(genuine + b" ") in refusal.detail and "nothing" in refusal.detail
    # What the coordinator gets: the code, not the detail.
    assert status_payload(refusal) == {"refused": True, "code": "untrusted-app"}


def test_a_pin_that_is_not_the_installed_release_is_named_with_both_values() -> None:
    installed = installed_release()
    assert pin_problems(ReleasePin(installed.version, installed.digest), installed) == []
    other = ReleasePin("9.9.9", fab_digest(b"another release"))
    problems = "\n".join(pin_problems(other, installed))
    assert "[release] version: the pin is 9.9.9" in problems
    assert other.digest in problems and installed.digest in problems


def test_replies_of_the_runner_carry_codes_only() -> None:
    from flwr.app import Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 9
    message = Message(RecordDict(), dst_node_id=9, message_type="train.secagg_setup")
    message.metadata.__dict__["_message_id"] = "m" * 64
    refused = refusal_reply(message, check_run_app(  # type: ignore[arg-type]
        pin=ReleasePin("0.1.0", fab_digest(b"a")), fab_content=b"b", fab_id="x/y", fab_version="1"
    ))  # fmt: skip
    status = dict(refused.content.config_records["status"])
    assert refusal_code_of(status) == "untrusted-app" and set(status) == {"refused", "code"}
    failed = error_reply(message)
    assert failed.has_error()
    assert (failed.error.code, failed.error.reason) == (
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        "site-error",
    )


def test_release_directory_is_this_checkout() -> None:
    assert installed_release().directory == Path(__file__).resolve().parents[2]
