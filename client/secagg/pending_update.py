"""The site's trained update, waiting on its own disk between the setup and masked stages.

The update is trained in the first SecAgg+ stage and masked in the third (Bell et al., CCS
2020; Bonawitz et al., CCS 2017). It must not wait in Flower's ``context.state``: the state
travels with every message to the ClientApp process, so a model-sized entry would slow every
later stage. It waits in a file instead, in a directory private to this node (mode 0700,
owned by this user, not a symlink, a unique name per node and run) and readable by this user
only (0600), one file per round.

It waits already encoded: the weighted, clipped update, the weight and the metrics
quantised into the round's ring (``common.secagg.input_encoding``), b bits an entry (32 by
default) instead of a 64-bit float, so the file is half the size or less and the masked
stage only adds masks. The encoding is the same one the masked stage made before, with fresh
rounding randomness: what is summed, and so what the coordinator learns, is unchanged.

The file holds two ``.npy`` records one after the other: a small JSON header (the round) as
bytes, then the encoded vector. Plain ``.npy`` is read straight into the array; an
``.npz`` archive would checksum and copy a model-sized update on both writing and reading.
No torch here: a deployed site may run the masked stage in a freshly started runner.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PREFIX = "pending-round-"
_SUFFIX = ".npy"


class PendingUpdateError(ValueError):
    """The waiting update is missing, unreadable, or for another round."""


@dataclass(frozen=True)
class PendingUpdate:
    round_id: int
    #: The encoded input (``encode_site_input``): unsigned integers of the round's ring.
    encoded: np.ndarray


def node_spill_dir(*, existing: str | None = None, base: str | None = None) -> Path:
    """This node's private directory: ``existing`` if it is still valid, else a new one.

    A new directory is made with ``mkdtemp`` (mode 0700, a unique name, so concurrent runs
    and nodes never share one) under ``base`` (the node config's ``secagg-spill-dir``), else
    the system temp dir. The caller keeps its path in the
    node's state, so the next stage (a fresh process in deployment) finds it again.
    """
    if existing:
        path = Path(existing)
        try:
            _check_private_dir(path)
            return path
        except (OSError, PendingUpdateError):
            pass  # gone or tampered with: make a new one
    root = Path(base or tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=f"fedmm-secagg-{os.getuid()}-", dir=root))
    _check_private_dir(path)
    return path


def _check_private_dir(path: Path) -> None:
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PendingUpdateError(f"{path} is not a directory owned by this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise PendingUpdateError(f"{path} is accessible to other users")


def save_pending_update(directory: Path, pending: PendingUpdate) -> Path:
    """Write the update for its round (0600, atomically); earlier rounds' files are removed."""
    discard_pending_updates(directory, before_round=pending.round_id + 1)
    target = directory / f"{_PREFIX}{pending.round_id}{_SUFFIX}"
    if not np.issubdtype(pending.encoded.dtype, np.unsignedinteger):
        raise PendingUpdateError("a waiting update is stored encoded (unsigned ring integers)")
    header = {"round_id": int(pending.round_id)}
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=_SUFFIX)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
            np.save(handle, np.ascontiguousarray(pending.encoded))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_pending_update(path: Path, *, round_id: int) -> PendingUpdate:
    """Read the waiting update of ``round_id``; raise ``PendingUpdateError`` otherwise."""
    try:
        with open(path, "rb") as handle:
            header = json.loads(np.load(handle, allow_pickle=False).tobytes().decode())
            update = np.load(handle, allow_pickle=False)
        stored_round = int(header["round_id"])
        if not np.issubdtype(update.dtype, np.unsignedinteger) or update.ndim != 1:
            raise ValueError(f"not an encoded vector ({update.dtype}, {update.ndim} dims)")
        pending = PendingUpdate(round_id=stored_round, encoded=update)
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as error:
        message = f"no readable update waiting for round {round_id}: {error}"
        raise PendingUpdateError(message) from None
    if stored_round != round_id:
        raise PendingUpdateError(f"waiting update is for round {stored_round}, not {round_id}")
    return pending


def discard_pending_updates(directory: Path, *, before_round: int | None = None) -> None:
    """Remove waiting updates (all, or those of rounds before ``before_round``)."""
    if not directory.is_dir():
        return
    for path in directory.glob(f"{_PREFIX}*{_SUFFIX}"):
        try:
            number = int(path.name.removeprefix(_PREFIX).removesuffix(_SUFFIX))
        except ValueError:
            continue
        if before_round is None or number < before_round:
            path.unlink(missing_ok=True)
