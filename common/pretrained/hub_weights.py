"""Frozen weights named by a Hugging Face hub repository instead of a local path.

``model-image-weights`` / ``model-text-weights`` may be ``hf-hub:<org>/<name>`` or
``hf-hub:<org>/<name>@<revision>`` (a branch, tag or commit; ``main`` when left out), the
form OpenCLIP uses for hub models. The name is resolved with
``huggingface_hub.snapshot_download`` into the machine's normal Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1`` only from that cache) and the
snapshot directory is then used exactly as a local one: the run's SHA-256 pin is still
required, and checked on the resolved files (``encoder_spec.weights_digest`` hashes a
snapshot's files by their relative paths and contents, so the pin of a downloaded snapshot
is the pin of a copy of it). A machine that cannot reach the hub and has no cached snapshot
gets a FrozenWeightsError naming the fix: copy the snapshot and name its path (at a site:
put it in ``[pretrained] weights-dir``).

Torch-free; ``huggingface_hub`` is imported only when a name is resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedmm.common.pretrained.encoder_spec import EncoderSpec, FrozenWeightsError

#: The prefix of a hub name in ``model-image-weights`` / ``model-text-weights``.
HUB_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


@dataclass(frozen=True)
class HubName:
    """A hub repository and the revision of it a run names."""

    repo_id: str  # "org/name"
    revision: str  # a branch, tag or commit

    @property
    def folder_name(self) -> str:
        """The name of a copy of its snapshot in a site's ``weights-dir``: ``<name>``."""
        return self.repo_id.split("/")[1]


def is_hub_name(weights: str) -> bool:
    """Whether ``weights`` names a hub repository (``hf-hub:...``) rather than a path."""
    return str(weights).startswith(HUB_PREFIX)


def parse_hub_name(weights: str) -> HubName:
    """``hf-hub:<org>/<name>[@<revision>]``; a FrozenWeightsError names the form."""
    body = str(weights)[len(HUB_PREFIX) :] if is_hub_name(weights) else ""
    repo_id, sep, revision = body.partition("@")
    revision = revision if sep else "main"
    if not _REPO_ID.fullmatch(repo_id) or not _REVISION.fullmatch(revision):
        raise FrozenWeightsError(
            f"frozen weights {weights!r} are not a hub name: use "
            f"'{HUB_PREFIX}<org>/<name>' or '{HUB_PREFIX}<org>/<name>@<revision>', or a "
            "local file or directory"
        )
    return HubName(repo_id=repo_id, revision=revision)


def resolve_hub_weights(weights: str) -> str:
    """The local snapshot directory of hub name ``weights`` (downloaded into, or found in,
    the Hugging Face cache); any other ``weights`` unchanged. A FrozenWeightsError names
    the fix when the hub is not reachable and the cache does not hold the snapshot."""
    if not is_hub_name(weights):
        return str(weights)
    name = parse_hub_name(weights)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise FrozenWeightsError(
            f"frozen weights {weights!r} name a hub repository, which needs huggingface_hub: "
            "pip install 'fedmm[pretrained]'"
        ) from error
    try:
        return str(snapshot_download(repo_id=name.repo_id, revision=name.revision))
    except Exception as error:  # offline, no network, no such repo or revision
        reached = error
    try:  # the cache alone (a commit revision is only looked up there with this flag)
        return str(
            snapshot_download(repo_id=name.repo_id, revision=name.revision, local_files_only=True)
        )
    except Exception as error:  # not in the cache either
        raise FrozenWeightsError(
            f"frozen weights {weights!r} could not be resolved on this machine: the hub "
            f"gave {type(reached).__name__} (not reachable from here, or no revision "
            f"{name.revision!r} of {name.repo_id}) and the Hugging Face cache has no snapshot "
            "of it; copy the snapshot directory to this machine and set "
            "model-image-weights / model-text-weights to its path, or, at a site, put it in "
            f"the [pretrained] weights-dir as {name.folder_name}/"
        ) from error


def site_copy_of_hub_weights(weights: str, weights_dir: str | None) -> str:
    """A site's weights for hub name ``weights``: its copy ``<weights-dir>/<name>`` when it
    has one, else the hub name itself (the site resolves it)."""
    if weights_dir:
        copy = Path(weights_dir) / parse_hub_name(weights).folder_name
        if copy.exists():
            return str(copy)
    return str(weights)


def resolve_spec(spec: EncoderSpec) -> EncoderSpec:
    """``spec`` with a hub name in its weights replaced by the local snapshot directory."""
    return spec.at(resolve_hub_weights(spec.weights)) if is_hub_name(spec.weights) else spec
