"""The release a site pinned, and the check that a run's app is that release.

A site pins ``[release] version`` and ``digest`` in its config (the digest of the release's
FAB: ``common.release_identity``); ``fedmm site check`` and ``site start`` refuse when the
installed release is not the pinned one, and the site runner refuses every run whose FAB has
another digest before anything of it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmm.common.release_identity import (
    ReleaseError,
    ReleaseIdentity,
    fab_digest,
    normalise_digest,
    release_directory,
    release_identity,
)
from fedmm.common.site_refusal import RefusalCode, SiteRefusal

__all__ = [
    "ReleaseError",
    "ReleasePin",
    "check_run_app",
    "installed_release",
    "normalise_digest",
    "pin_problems",
]


@dataclass(frozen=True)
class ReleasePin:
    """The release a site runs: ``[release] version`` and ``digest`` of its config."""

    version: str
    digest: str


def installed_release() -> ReleaseIdentity:
    """The identity of the release this site runs."""
    return release_identity(release_directory())


def pin_problems(pin: ReleasePin, installed: ReleaseIdentity) -> list[str]:
    """Why the installed release is not the pinned one (empty when it is)."""
    problems = []
    if pin.version != installed.version:
        problems.append(
            f"[release] version: the pin is {pin.version} but fedmm {installed.version} is "
            f"installed in {installed.directory}; install the pinned release or, after "
            "reviewing this one, pin it"
        )
    if pin.digest != installed.digest:
        problems.append(
            f"[release] digest: the pin is {pin.digest} but the installed release in "
            f"{installed.directory} has {installed.digest}; install the pinned release (its "
            "checkout must hold only the release's files) or, after reviewing this one, pin "
            "its digest"
        )
    return problems


def check_run_app(
    *, pin: ReleasePin, fab_content: bytes, fab_id: str, fab_version: str
) -> SiteRefusal | None:
    """``None`` when the run's app is the pinned release, else the refusal (its detail is
    for the site's log only)."""
    digest = fab_digest(fab_content)
    if digest == pin.digest:
        return None
    return SiteRefusal(
        RefusalCode.UNTRUSTED_APP,
        f"the run's app {fab_id} {fab_version} has digest {digest}, not the pinned release "
        f"fedmm {pin.version} ({pin.digest}); nothing of the submitted app was run",
    )
