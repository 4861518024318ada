"""Find the processes one test started, and only those, on a machine shared with other work.

A test puts ``FEDMM_TEST_RUN=<marker>`` in the environment of what it starts; every process
started from there (Ray's raylet, GCS and actors, shadow workers) inherits it. Looking for
Ray processes by name instead would also see other simulations running on the machine.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

MARKER_VARIABLE = "FEDMM_TEST_RUN"


def new_marker() -> dict[str, str]:
    """An environment entry that marks everything a test starts with it."""
    return {MARKER_VARIABLE: uuid.uuid4().hex}


def processes_marked(marker: dict[str, str]) -> set[int]:
    """Live (not zombie) processes whose environment holds ``marker``."""
    needle = "{}={}".format(*next(iter(marker.items()))).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text()
                if state[state.rindex(")") + 2 :].split()[0] not in ("Z", "X"):
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def none_left(marker: dict[str, str], *, wait_s: float = 30.0) -> bool:
    """Whether every marked process is gone within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not processes_marked(marker):
            return True
        time.sleep(1.0)
    return False
