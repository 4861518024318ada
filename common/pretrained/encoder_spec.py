"""What a run names as a pretrained encoder, and the digest that pins its frozen weights.

Run config ``model-image-encoder`` / ``model-text-encoder`` take, beside the built-in
encoders, ``timm:<architecture>`` (an image backbone of ``timm``), ``hf:<name>`` (a text
encoder of Hugging Face ``transformers``; the name is informational, the files say what it
is) or ``open_clip:<architecture>`` (an image-text pair of ``open_clip``, named on both keys).
The weights come from a local file or directory named by ``model-image-weights`` /
``model-text-weights``, or a hub repository there (``hf-hub:<org>/<name>[@<revision>]``,
resolved to a local snapshot by ``hub_weights``), pinned by ``model-image-weights-sha256`` /
``model-text-weights-sha256`` (:func:`weights_digest`). Torch-free: the coordinator's config
checks and the site's refusal use it without the optional libraries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

#: The prefixes of pretrained encoders, each the library that builds it.
PRETRAINED_KINDS = ("timm", "hf", "open_clip")
#: Image encoders that may be pretrained, and text encoders.
PRETRAINED_IMAGE_KINDS = ("timm", "open_clip")
PRETRAINED_TEXT_KINDS = ("hf", "open_clip")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


class FrozenWeightsError(ValueError):
    """Frozen weights that are missing, or whose digest is not the one the run pins."""


def pretrained_kind(encoder: str) -> str | None:
    """``"timm"``, ``"hf"`` or ``"open_clip"`` for a pretrained encoder name, else None."""
    prefix, sep, _ = str(encoder).partition(":")
    return prefix if sep and prefix in PRETRAINED_KINDS else None


@dataclass(frozen=True)
class EncoderSpec:
    """One pretrained encoder: its library, architecture, weights and their pinned digest."""

    kind: str  # "timm", "hf" or "open_clip"
    architecture: str
    weights: str  # a local file or directory, or a hub name (hub_weights)
    sha256: str

    @classmethod
    def parse(cls, encoder: str, *, weights: str, sha256: str, key: str) -> EncoderSpec:
        """The spec named by run config ``key`` = ``encoder`` with its weights and digest;
        a FrozenWeightsError names the key and the fix."""
        kind = pretrained_kind(encoder)
        architecture = str(encoder).partition(":")[2].strip()
        if kind is None or not architecture:
            raise FrozenWeightsError(
                f"run config '{key}' = {encoder!r} is not a pretrained encoder: use one of "
                + ", ".join(f"'{k}:<architecture>'" for k in PRETRAINED_KINDS)
            )
        if not weights:
            raise FrozenWeightsError(
                f"run config '{key}' = {encoder!r} needs its frozen weights: set "
                f"'{key.replace('encoder', 'weights')}' to a local file or directory, or a "
                "hub name 'hf-hub:<org>/<name>[@<revision>]', and its sha256"
            )
        if not _SHA256_HEX.fullmatch(sha256 or ""):
            raise FrozenWeightsError(
                f"run config '{key.replace('encoder', 'weights')}-sha256' = {sha256!r} is "
                f"invalid: use the 64 lower-case hex digits `fedmm weights-digest {weights}` "
                "prints"
            )
        return cls(kind=kind, architecture=architecture, weights=str(weights), sha256=sha256)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.architecture}"

    def at(self, weights: str | Path) -> EncoderSpec:
        """The same encoder with its weights at a site's own path."""
        return EncoderSpec(self.kind, self.architecture, str(weights), self.sha256)


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a weights file; of a directory, SHA-256 over each file's relative path and
    SHA-256 (sorted, hidden files skipped), so that a renamed, edited, added or removed
    file changes it."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        raise FrozenWeightsError(f"frozen weights {path} do not exist: copy them there")
    outer = hashlib.sha256(b"fedmm weights directory\x00")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for file in files:
        outer.update(file.relative_to(path).as_posix().encode() + b"\x00")
        outer.update(_file_digest(file).encode() + b"\n")
    return outer.hexdigest()


_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    info = path.stat()
    memo = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if memo not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
        _digests[memo] = digest.hexdigest()
    return _digests[memo]


def check_weights(spec: EncoderSpec) -> None:
    """Raise FrozenWeightsError unless ``spec.weights`` exists and has ``spec.sha256``."""
    actual = weights_digest(spec.weights)
    if actual != spec.sha256:
        raise FrozenWeightsError(
            f"frozen weights {spec.weights} of {spec.name} have SHA-256 {actual}, but the run "
            f"pins {spec.sha256}: they are not the weights the run was started with; put "
            "the pinned weights there, or start a run that pins these"
        )


def site_weights_path(run_path: str, weights_dir: str | None) -> str:
    """Where a site keeps the frozen weights the run names at ``run_path``: under its own
    ``weights_dir`` (node config ``pretrained-weights-dir``) by the same file or directory
    name, else at ``run_path`` itself (a simulation on one machine)."""
    if not weights_dir:
        return run_path
    return str(Path(weights_dir) / Path(run_path).name)
