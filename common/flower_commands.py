"""Flower's command-line programs of this environment, and the environment to run them in.

``flower-superlink`` and ``flower-supernode`` start helpers such as ``flower-superexec`` by
name, through PATH. When this project runs from a virtual environment that is not on PATH
(``.venv/bin/fedmm``, ``.venv/bin/pytest``), those helpers would not be found: the
environment built here puts this Python's ``bin`` directory first.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path


class FlowerCommandNotFoundError(FileNotFoundError):
    """A Flower program is missing from this environment."""


def flower_executable(name: str) -> str:
    """The Flower command ``name`` next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FlowerCommandNotFoundError(
            f"`{name}` not found: install flwr==1.41.* in this environment"
        )
    return found


def flower_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with this Python's ``bin`` directory first on PATH."""
    env = {**os.environ, **(extra or {})}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    return env
