"""Round checkpoints of the global model, written atomically so a crash keeps the last one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"


@dataclass(frozen=True)
class Checkpoint:
    server_round: int
    weights: dict[str, np.ndarray]


def save_checkpoint(
    out_dir: Path, server_round: int, weights: dict[str, np.ndarray], *, keep: int = 2
) -> Path:
    """Write ``round-N.safetensors`` then point ``latest.json`` at it; keep the newest ``keep``."""
    directory = out_dir / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{server_round:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp))
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
    weights = load_file(str(out_dir / CHECKPOINT_DIR / info["file"]))
    return Checkpoint(server_round=int(info["round"]), weights=weights)
