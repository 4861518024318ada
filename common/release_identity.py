"""A fedmm release's identity: Flower's app id, its version, and the digest of its FAB.

**The release digest** is the SHA-256 of the Flower App Bundle (FAB) that Flower builds from
the release's source tree: ``flwr run`` and ``flwr build`` both call
``flwr.cli.build.build_fab_from_disk`` on the app directory, and that build is deterministic
(files sorted, fixed timestamps, the same include and exclude rules, ``.gitignore``
honoured). So three people compute the same value from the same release:

- the operator: ``flwr build --app DIR`` names the file ``fedmm.fedmm.<version>.<hash8>.fab``
  and ``sha256sum`` of it is the digest; ``fedmm coordinator submit`` prints it;
- the site: ``fedmm site release-digest`` builds the FAB of the installed release in memory;
- the site runner: the SHA-256 of the FAB bytes that the SuperNode received for a run.

A site pins the digest (``client.release_pin``). The installed release is the source tree
these packages are imported from (an editable install of a release checkout, as
``.ci/setup`` makes): its FAB needs the tree's ``pyproject.toml``. A checkout holds only the
release's files: an extra ``.toml``, ``.md`` or ``.py`` file in it changes the digest
(``fedmm site release-digest --files`` lists what it covers).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DIGEST_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(ValueError):
    """The installed release or a pin is unusable; the message names the fix."""


@dataclass(frozen=True)
class ReleaseIdentity:
    """What identifies a release: Flower's app id, the version and the FAB digest."""

    fab_id: str  # "<publisher>/<name>", as Flower names the app of a run
    version: str
    digest: str  # "sha256:<64 hex>"
    directory: Path


def fab_digest(fab_content: bytes) -> str:
    """``sha256:<hex>`` of a FAB's bytes (Flower's FAB hash, with its algorithm named)."""
    return DIGEST_PREFIX + hashlib.sha256(fab_content).hexdigest()


def normalise_digest(text: str) -> str:
    """A digest as ``sha256:<64 lower-case hex>``; a bare hex digest (``sha256sum``) is
    accepted. ``ReleaseError`` otherwise."""
    value = text.strip().lower()
    value = value.removeprefix(DIGEST_PREFIX)
    if not _HEX_DIGEST.match(value):
        raise ReleaseError(
            f"{text!r} is not a SHA-256 digest (sha256: and 64 hex digits); compute it with "
            "`fedmm site release-digest`"
        )
    return DIGEST_PREFIX + value


def release_directory() -> Path:
    """The source tree the installed packages come from, with the app's ``pyproject.toml``."""
    directory = Path(__file__).resolve().parents[1]
    if not (directory / "pyproject.toml").is_file():
        raise ReleaseError(
            f"fedmm is installed without its source tree ({directory} has no pyproject.toml): "
            "install the release from its checkout (`bash .ci/setup` there, an editable "
            "install), so that its digest can be computed"
        )
    return directory


def app_identity(directory: Path) -> tuple[str, str]:
    """``(fab_id, version)`` from the app's ``pyproject.toml``."""
    try:
        data = tomllib.loads((directory / "pyproject.toml").read_text(encoding="utf-8"))
        project, app = data["project"], data["tool"]["flwr"]["app"]
        return f"{app['publisher']}/{project['name']}", str(project["version"])
    except (OSError, tomllib.TOMLDecodeError, KeyError) as err:
        raise ReleaseError(
            f"{directory / 'pyproject.toml'} is not a Flower App's pyproject.toml ({err!r})"
        ) from err


@lru_cache(maxsize=2)
def release_fab(directory: Path) -> bytes:
    """The FAB that ``flwr run``/``flwr build`` make of ``directory`` (Flower's own build;
    a few seconds, so it is kept for the process)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(directory)
    except ValueError as err:
        raise ReleaseError(f"Flower cannot build the app in {directory}: {err}") from err


@lru_cache(maxsize=4)
def release_identity(directory: Path) -> ReleaseIdentity:
    """The identity of the release in ``directory`` (builds its FAB: a few seconds)."""
    fab_id, version = app_identity(directory)
    return ReleaseIdentity(fab_id, version, fab_digest(release_fab(directory)), directory)


def release_files(directory: Path) -> list[str]:
    """The files the digest covers (the FAB's entries, ``.info/CONTENT`` excluded)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(release_fab(directory))) as fab:
        return [name for name in fab.namelist() if not name.startswith(".info/")]
