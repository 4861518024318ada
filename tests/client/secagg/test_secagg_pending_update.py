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


def _pending(round_id: int = 3) -> PendingUpdate:
    update = np.random.default_rng(round_id).normal(0.0, 0.1, 10_001)
    return PendingUpdate(
        round_id=round_id, update=update, weight=417, metrics={"steps": 4170.0, "loss": 0.5}
    )


def test_the_update_comes_back_exactly_from_a_private_file(tmp_path: Path) -> None:
    directory = node_spill_dir(base=str(tmp_path))
    pending = _pending()
    path = save_pending_update(directory, pending)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    loaded = load_pending_update(path, round_id=3)
    assert loaded.update.dtype == np.float64
    assert np.array_equal(loaded.update, pending.update)
    assert (loaded.round_id, loaded.weight, loaded.metrics) == (3, 417, pending.metrics)


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
