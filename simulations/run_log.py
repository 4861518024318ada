"""A quiet terminal for long runs: everything the libraries print goes to a log file.

A simulation prints from many places: Flower's logger, Ray's own messages and every Ray
actor's stdout and stderr (forwarded to the driver), library warnings from each site (Opacus,
PyTorch). :func:`terminal_to_log` points file descriptors 1 and 2 of this process, and so of
every process it starts, at a log file in the run folder, and hands back a stream on the real
terminal for what the user should see (the progress bar, one line per round, the summary).
With ``verbose`` nothing is redirected.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

RUN_LOG = "run.log"


@contextlib.contextmanager
def terminal_to_log(log_path: Path, *, verbose: bool = False) -> Iterator[TextIO]:
    """Redirect stdout and stderr (file descriptors, so child processes too) to
    ``log_path`` (appended) and yield a text stream on the original terminal."""
    if verbose:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for handle in (fd, saved_out, saved_err):
            os.close(handle)
        terminal.close()


def log_tail(log_path: Path, *, lines: int = 20) -> str:
    """The last ``lines`` lines of the log (what to show when a run fails)."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
