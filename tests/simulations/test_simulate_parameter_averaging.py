"""``average-decay``: the released model is the EMA of the rounds' global models, resumed too.

A real 3-site run through Flower's simulation runtime (``fedmm simulate``); the expected
average is rebuilt from the initial model and the per-round checkpoints of the raw global
model, so the test fails if the coordinator releases the last model, averages with another
decay, or forgets the average on resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.federation_config import FederationConfig
from fedmm.common.parameter_averaging import average_parameters
from fedmm.server.checkpoints import SERVER_STATE_PREFIX
from fedmm.server.federation import AVERAGE_PREFIX, initial_model
from tests.simulations.marked_processes import new_marker, none_left

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

DECAY = 0.9
SMALL = [
    "--sites", "3", "--epsilon", "inf",
    "--set", "site-records-limit=120", "--set", "eval-single-items=200",
    "--set", "eval-scenes=20", "--set", "batch-size=32", "--set", "eval-every=0",
    "--set", f"average-decay={DECAY}", "--quiet",
]  # fmt: skip


def _simulate(out: Path, *args: str, marker: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedmm.simulations.cli", "simulate", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **marker},
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A round checkpoint's global model (without the coordinator's saved state)."""
    return {k: v for k, v in load_file(path).items() if not k.startswith(SERVER_STATE_PREFIX)}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_released_model_is_the_average_of_the_rounds_and_survives_resume(
    tmp_path: Path,
) -> None:
    marker = new_marker()
    out = tmp_path / "run"
    _simulate(out, "--rounds", "2", *SMALL, marker=marker)
    config = FederationConfig.from_run_config(json.loads((out / "run-config.json").read_text()))
    assert config.average_decay == DECAY
    torch.manual_seed(config.seed)
    start = {k: v.detach().clone() for k, v in initial_model(config).state_dict().items()}
    rounds = [_weights(out / "checkpoints" / f"round-{r:04d}.safetensors") for r in (1, 2)]
    expected = start
    for step, weights in enumerate(rounds, start=1):
        expected = average_parameters(expected, weights, decay=DECAY, step=step)
    released = load_file(out / "model.safetensors")
    assert _close(released, expected)
    assert not _close(released, rounds[-1])  # not simply the last round's model

    _simulate(out, "--resume", "--rounds", "3", *SMALL, marker=marker)
    averaged_state = {
        k.removeprefix(SERVER_STATE_PREFIX + AVERAGE_PREFIX): v
        for k, v in load_file(out / "checkpoints" / "round-0002.safetensors").items()
        if k.startswith(SERVER_STATE_PREFIX + AVERAGE_PREFIX)
    }
    assert _close(averaged_state, expected)  # the checkpoint keeps the average for resume
    third = _weights(out / "checkpoints" / "round-0003.safetensors")
    expected = average_parameters(expected, third, decay=DECAY, step=3)
    assert _close(load_file(out / "model.safetensors"), expected)
    assert none_left(marker), "the simulation left processes (Ray's included) behind"
