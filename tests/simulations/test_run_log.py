"""The quiet terminal: library and child-process output goes to the run log, ours does not."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fedmm.simulations.cli import round_line
from fedmm.simulations.run_log import log_tail

SCRIPT = textwrap.dedent(
    """
    import logging, subprocess, sys
    from pathlib import Path
    from fedmm.simulations.run_log import terminal_to_log

    logging.basicConfig(level=logging.DEBUG)
    verbose = sys.argv[2] == "verbose"
    with terminal_to_log(Path(sys.argv[1]), verbose=verbose) as terminal:
        print("ours", file=terminal, flush=True)
        print("python-stdout-noise", flush=True)
        logging.getLogger("flwr").debug("library-debug-noise")
        subprocess.run(["sh", "-c", "echo child-stderr-noise >&2; echo child-stdout-noise"])
    print("after")
    """
)


def _run(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    log = tmp_path / "run.log"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    return result, log


def test_only_our_lines_reach_the_terminal_and_the_rest_is_logged(tmp_path: Path) -> None:
    result, log = _run(tmp_path, "quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ours", "after"]
    assert result.stderr == ""
    logged = log.read_text()
    for noise in (
        "python-stdout-noise",
        "library-debug-noise",
        "child-stderr-noise",
        "child-stdout-noise",
    ):
        assert noise in logged
    assert "ours" not in logged
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert log_tail(log, lines=1).strip() == "child-stdout-noise"


def test_verbose_shows_everything_and_writes_no_log(tmp_path: Path) -> None:
    result, log = _run(tmp_path, "verbose")
    assert result.returncode == 0, result.stderr
    assert "child-stdout-noise" in result.stdout and "child-stderr-noise" in result.stderr
    assert "library-debug-noise" in result.stderr
    assert not log.exists()


def test_round_line_names_what_a_user_needs() -> None:
    row = {
        "round": 3,
        "accuracy": 0.61234,
        "r_at_1_i2t": 0.2,
        "r_at_1_t2i": 0.1,
        "epsilon_bound_max": 3.0,
        "sites_trained": 9,
        "sites_refused": 1,
        "sites_failed": 0,
        "wall_s": 21.44,
    }
    assert round_line(row, 14) == (
        "round 3/14, accuracy 0.612, R@1 i2t 0.200 t2i 0.100, epsilon_bound_max 3.0, "
        "sites trained 9 refused 1 failed 0, 21.4 s"
    )
    aborted = round_line({"round": 4, "aborted": "no site trained this round"}, 14)
    assert aborted.endswith("(model unchanged: no site trained this round)")
