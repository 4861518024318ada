"""Round checkpoints: weights and the coordinator's state come back apart, the newest wins."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.server.checkpoints import load_latest_checkpoint, save_checkpoint


def test_weights_and_server_state_round_trip_separately(tmp_path) -> None:
    weights = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    state = {"layer.weight": np.full((2, 3), 0.5, dtype=np.float32)}
    save_checkpoint(tmp_path, 1, weights, server_state=state)
    save_checkpoint(tmp_path, 2, {k: v + 1 for k, v in weights.items()})
    checkpoint = load_latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.server_round == 2
    assert set(checkpoint.weights) == {"layer.weight"}
    np.testing.assert_array_equal(checkpoint.weights["layer.weight"], weights["layer.weight"] + 1)
    assert checkpoint.server_state == {}
    save_checkpoint(tmp_path, 3, weights, server_state=state)
    checkpoint = load_latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.server_round == 3
    np.testing.assert_array_equal(checkpoint.server_state["layer.weight"], state["layer.weight"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.safetensors")) == [
        "round-0002.safetensors",
        "round-0003.safetensors",
    ]


def test_a_weight_named_like_server_state_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="server-state/"):
        save_checkpoint(tmp_path, 1, {"server-state/x": np.zeros(1, dtype=np.float32)})
    assert load_latest_checkpoint(tmp_path) is None
