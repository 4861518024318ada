"""The update that waits between the SecAgg+ setup and masked stages (node-private file)."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from fedmm.client.secagg.pending_update import (
    PendingUpdate,
    PendingUpdateError,
    discard_pending_updates,
    load_pending_update,
    node_spill_dir,
    save_pending_update,
)

LENGTH = 10_001


def _pending(round_id: int = 3) -> PendingUpdate:
    encoded = np.random.default_rng(round_id).integers(0, 2**32, LENGTH, dtype=np.uint32)
    return PendingUpdate(round_id=round_id, encoded=encoded)


def test_the_encoded_update_comes_back_exactly_from_a_private_file(tmp_path: Path) -> None:
    directory = node_spill_dir(base=str(tmp_path))
    pending = _pending()
    path = save_pending_update(directory, pending)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    loaded = load_pending_update(path, round_id=3)
    assert loaded.encoded.dtype == np.uint32 and loaded.round_id == 3
    assert np.array_equal(loaded.encoded, pending.encoded)
    # Quantised: 4 bytes an entry (a float64 update took 8), plus a small header.
    assert path.stat().st_size < 4 * LENGTH + 512


def test_only_an_encoded_vector_is_stored_or_read(tmp_path: Path) -> None:
    directory = node_spill_dir(base=str(tmp_path))
    with pytest.raises(PendingUpdateError, match="encoded"):
        save_pending_update(directory, PendingUpdate(round_id=1, encoded=np.zeros(5)))
    path = save_pending_update(directory, _pending(1))
    with open(path, "r+b") as handle:  # a float64 vector in place of the encoded one
        header = np.load(handle)
        handle.seek(0)
        np.save(handle, header)
        np.save(handle, np.zeros(LENGTH))
    with pytest.raises(PendingUpdateError, match="not an encoded vector"):
        load_pending_update(path, round_id=1)


def test_a_file_of_another_round_or_a_damaged_file_is_refused(tmp_path: Path) -> None:
    directory = node_spill_dir(base=str(tmp_path))
    path = save_pending_update(directory, _pending(3))
    with pytest.raises(PendingUpdateError, match="round 3, not 4"):
        load_pending_update(path, round_id=4)
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    with pytest.raises(PendingUpdateError, match="no readable update"):
        load_pending_update(path, round_id=3)
    path.write_bytes(b"not an array at all")
    with pytest.raises(PendingUpdateError, match="no readable update"):
        load_pending_update(path, round_id=3)
    with pytest.raises(PendingUpdateError, match="no readable update"):
        load_pending_update(directory / "missing.npy", round_id=3)


def test_earlier_rounds_are_discarded(tmp_path: Path) -> None:
    directory = node_spill_dir(base=str(tmp_path))
    first = save_pending_update(directory, _pending(1))
    second = save_pending_update(directory, _pending(2))
    assert not first.exists() and second.exists()
    discard_pending_updates(directory)
    assert not list(directory.iterdir())
