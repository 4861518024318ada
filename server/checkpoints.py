"""Round checkpoints of the global model, written atomically so a crash keeps the last one.

A checkpoint also holds the coordinator's optimiser state where it has one (the server
momentum of distributed DP), so a resumed run continues the same optimisation instead of
restarting it; those tensors are stored under the ``server-state/`` prefix."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
SERVER_STATE_PREFIX = "server-state/"


@dataclass(frozen=True)
class Checkpoint:
    server_round: int
    weights: dict[str, np.ndarray]
    server_state: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(
    out_dir: Path,
    server_round: int,
    weights: dict[str, np.ndarray],
    *,
    server_state: dict[str, np.ndarray] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``round-N.safetensors`` then point ``latest.json`` at it; keep the newest ``keep``."""
    clash = [k for k in weights if k.startswith(SERVER_STATE_PREFIX)]
    if clash:
        raise ValueError(f"model weight names may not start with {SERVER_STATE_PREFIX!r}: {clash}")
    directory = out_dir / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{server_round:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    tensors = dict(weights) | {SERVER_STATE_PREFIX + k: v for k, v in (server_state or {}).items()}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    pointer = directory / LATEST
    pointer_tmp = pointer.with_suffix(".tmp")
    pointer_tmp.write_text(json.dumps({"round": server_round, "file": path.name}))
    os.replace(pointer_tmp, pointer)
    for old in sorted(directory.glob("round-*.safetensors"))[:-keep]:
        old.unlink()
    return path


def load_latest_checkpoint(out_dir: Path) -> Checkpoint | None:
    pointer = out_dir / CHECKPOINT_DIR / LATEST
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    tensors = load_file(str(out_dir / CHECKPOINT_DIR / info["file"]))
    weights = {k: v for k, v in tensors.items() if not k.startswith(SERVER_STATE_PREFIX)}
    server_state = {
        k.removeprefix(SERVER_STATE_PREFIX): v
        for k, v in tensors.items()
        if k.startswith(SERVER_STATE_PREFIX)
    }
    return Checkpoint(server_round=int(info["round"]), weights=weights, server_state=server_state)
