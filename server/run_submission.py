"""Submitting a training run to the coordinator's SuperLink, and resuming it (flwr 1.41).

``flwr run APP CONNECTION --run-config FILE --stream`` packs the app into a FAB and hands it
to the SuperLink, whose ServerApp runs in another process and working directory (from a
copy under ``$FLWR_HOME/apps/``): the run's outputs go to an absolute ``out-dir``. This
module checks everything that can be checked before submitting (the connection, the
out dir, every run config value) and writes the whole run config the ServerApp gets into
the out dir (``submitted-run-config.toml``), so that a resume continues the same run, even
after the app's defaults changed. With ``resume = true`` the round loop starts after the
last checkpoint (``server.federation``, ``server.checkpoints``).

Submit from the coordinator machine, as the user the SuperLink runs as: the out dir is a
path on that machine, checked here and written by the SuperLink's ServerApp.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.common.cli_arguments import key_value_pairs
from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.flower_commands import flower_executable
from fedmm.server.checkpoints import CHECKPOINT_DIR, LATEST
from fedmm.server.superlink_control import DISABLE_DEPENDENCY_INSTALL_ENV, DeploymentError

SUBMITTED_CONFIG = "submitted-run-config.toml"
SUBMISSIONS_LOG = "submissions.jsonl"
#: Keys a resume may change: they do not change what the rounds compute.
RESUMABLE_KEYS = frozenset(
    {"num-server-rounds", "round-timeout", "secagg-stage-timeout", "min-available-sites"}
)
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class SubmissionError(DeploymentError):
    """A run cannot be submitted as asked; the message names the input and the fix."""


@dataclass(frozen=True)
class RunSubmission:
    """The exact ``flwr run`` command, and what it will write where."""

    argv: list[str]
    env: dict[str, str]
    out_dir: Path
    run_config: dict[str, Any]  # the whole run config this submission sets (typed)
    num_server_rounds: int
    resume_after: int | None  # the last checkpointed round when resuming (None: from round 1)

    @property
    def config_file(self) -> Path:
        return self.out_dir / SUBMITTED_CONFIG

    def shell_line(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{prefix} {shlex.join(self.argv)}".strip()


@dataclass(frozen=True)
class RunProgress:
    """What the out dir shows of a run: rounds checkpointed, and whether it finished."""

    last_checkpoint: int | None
    rounds_logged: int
    finished: bool


def default_app_directory() -> Path:
    """The project checkout this package runs from (it holds the Flower App's pyproject)."""
    return Path(__file__).resolve().parents[1]


def app_run_config_defaults(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app in ``app_dir``."""
    pyproject = Path(app_dir) / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text())
        return dict(data["tool"]["flwr"]["app"]["config"])
    except (OSError, tomllib.TOMLDecodeError, KeyError) as err:
        raise SubmissionError(
            f"--app {app_dir}: no Flower App there ({pyproject} with [tool.flwr.app.config] "
            f"is {'unreadable' if isinstance(err, OSError) else 'missing or invalid'}); name "
            "the fedmm project checkout"
        ) from err


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs."""
    out = key_value_pairs(pairs, option="--set")
    for key in ("out-dir", "resume"):
        if key in out:
            raise SubmissionError(f"--set {key}=...: use --out-dir DIR and --resume instead")
    return out


def check_connection(name: str) -> dict[str, Any]:
    """``[superlink.NAME]`` of ``$FLWR_HOME/config.toml``."""
    from flwr.cli.flower_config import read_flower_config

    config, path = read_flower_config()
    connections = config.get("superlink", {})
    entry = connections.get(name)
    if not isinstance(entry, dict) or "address" not in entry:
        known = sorted(k for k, v in connections.items() if isinstance(v, dict))
        raise SubmissionError(
            f"connection {name!r} is not in {path} (known: {', '.join(known) or 'none'}); add "
            f"it with `fedmm coordinator add-connection {name} --address HOST:PORT "
            "--ca-cert ca.crt`"
        )
    return entry


def check_out_dir(out_dir: Path, *, create: bool = True) -> Path:
    """Make ``out_dir`` (0700 when new) and prove it writable; returns its absolute path.
    With ``create=False`` (a dry run) nothing is made: a missing directory must be
    creatable (its nearest existing parent writable)."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise SubmissionError(f"--out-dir {out_dir} is a file: name a directory")
    if not create:
        existing = out_dir
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise SubmissionError(
                f"--out-dir {out_dir} is not writable ({existing} is not a writable "
                "directory): name a directory the SuperLink's user can write, or fix its "
                "permissions"
            )
        return out_dir
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise SubmissionError(
            f"--out-dir {out_dir} is not writable ({err.strerror or err}): name a directory "
            "the SuperLink's user can write, or fix its permissions"
        ) from err
    return out_dir


def run_progress(out_dir: Path, *, num_server_rounds: int) -> RunProgress:
    """Rounds checkpointed and logged in ``out_dir``; finished when the final model and
    summary exist for every round."""
    pointer = out_dir / CHECKPOINT_DIR / LATEST
    last = None
    if pointer.exists():
        try:
            last = int(json.loads(pointer.read_text())["round"])
        except (ValueError, KeyError, json.JSONDecodeError):
            last = None
    metrics = out_dir / "metrics.jsonl"
    logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    finished = (
        (out_dir / "summary.json").exists()
        and (out_dir / "model.safetensors").exists()
        and last is not None
        and last >= num_server_rounds
    )
    return RunProgress(last_checkpoint=last, rounds_logged=logged, finished=finished)


def _typed(overrides: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The whole run config (every key of the app) with ``overrides`` applied, each value
    checked by ``FederationConfig`` and typed like the app's default."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise SubmissionError(
            f"--set {', '.join(unknown)}: not a run config key of the app; known keys: "
            f"{', '.join(sorted(defaults))}"
        )
    try:
        config = FederationConfig.from_run_config({**defaults, **overrides}).to_run_config()
    except ConfigError as err:
        raise SubmissionError(f"--set: {err}") from err
    return {key: config[key] for key in defaults}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "inf" if math.isinf(value) and value > 0 else repr(value)
    return json.dumps(str(value))  # a TOML basic string


def read_submitted_config(out_dir: Path) -> dict[str, Any]:
    path = out_dir / SUBMITTED_CONFIG
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise SubmissionError(
            f"--resume: {out_dir} holds no submitted run ({SUBMITTED_CONFIG} is missing); "
            "submit a new run without --resume"
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise SubmissionError(f"--resume: {path} is not valid TOML ({err})") from err


def prepare_submission(
    *,
    connection: str,
    out_dir: Path,
    settings: Mapping[str, str],
    resume: bool = False,
    app_dir: Path | None = None,
    stream: bool = True,
    dry_run: bool = False,
) -> RunSubmission:
    """Check the connection, the out dir and the settings; build the ``flwr run`` command.

    A new run needs a new or empty out dir. A resume takes the run config from the out
    dir's ``submitted-run-config.toml``; ``settings`` may change only :data:`RESUMABLE_KEYS`.
    """
    app_dir = Path(app_dir).resolve() if app_dir else default_app_directory()
    defaults = app_run_config_defaults(app_dir)
    check_connection(connection)
    out_dir = check_out_dir(out_dir, create=not dry_run)
    requested = _typed(settings, defaults)
    changes = {key: requested[key] for key in settings}
    if resume:
        submitted = read_submitted_config(out_dir)
        base = _typed({k: v for k, v in submitted.items() if k in defaults}, defaults)
        changed = sorted(k for k, v in changes.items() if k not in RESUMABLE_KEYS and base[k] != v)
        if changed:
            raise SubmissionError(
                f"--resume continues the same run: --set {', '.join(changed)} differs from the "
                f"submitted run ({out_dir / SUBMITTED_CONFIG}); a resume may change only "
                f"{', '.join(sorted(RESUMABLE_KEYS))}. Start a new run in a new --out-dir."
            )
        run_config = {**base, **changes}
    else:
        leftovers = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
        if leftovers:
            hint = (
                "it holds a run: continue it with --resume, or name a new --out-dir"
                if (out_dir / SUBMITTED_CONFIG).exists() or (out_dir / "metrics.jsonl").exists()
                else "name a new or empty directory"
            )
            shown = ", ".join(leftovers[:3]) + (", ..." if len(leftovers) > 3 else "")
            raise SubmissionError(f"--out-dir {out_dir} is not empty ({shown}): {hint}")
        run_config = requested
    rounds = int(run_config["num-server-rounds"])
    progress = run_progress(out_dir, num_server_rounds=rounds)
    if resume and progress.finished:
        raise SubmissionError(
            f"--resume: the run in {out_dir} already finished all {rounds} rounds; to train "
            f"longer, resume with --set num-server-rounds=N (N > {rounds})"
        )
    check_coordinator_weights(run_config)
    run_config = {**run_config, "out-dir": str(out_dir), "resume": bool(resume)}
    argv = [
        flower_executable("flwr"),
        "run",
        str(app_dir),
        connection,
        "--run-config",
        str(out_dir / SUBMITTED_CONFIG),
    ]
    if stream:
        argv.append("--stream")
    return RunSubmission(
        argv=argv,
        env={DISABLE_DEPENDENCY_INSTALL_ENV: "1"},
        out_dir=out_dir,
        run_config=run_config,
        num_server_rounds=rounds,
        resume_after=progress.last_checkpoint if resume else None,
    )


def check_coordinator_weights(run_config: Mapping[str, Any]) -> None:
    """With pretrained encoders, the coordinator's own copy of the frozen weights at the
    paths the run names (a hub name resolved here), checked against the run's pins: the
    ServerApp loads it on this machine to learn the feature widths, and would otherwise
    fail after the run started."""
    from fedmm.common.federation_config import encoder_specs_of
    from fedmm.common.pretrained.encoder_spec import (
        FrozenWeightsError,
        check_weights,
        pretrained_kind,
    )
    from fedmm.common.pretrained.hub_weights import resolve_spec

    config = FederationConfig.from_run_config(run_config)
    if pretrained_kind(config.model_image_encoder) is None:
        return
    try:
        for spec in encoder_specs_of(config):
            check_weights(resolve_spec(spec))
    except FrozenWeightsError as err:
        raise SubmissionError(
            f"--set model-image-weights / model-text-weights: {err} (the coordinator loads "
            "its own copy at the run's path to learn the encoders' feature widths)"
        ) from err


def write_submitted_config(submission: RunSubmission) -> Path:
    """The run config as submitted (``flwr run --run-config FILE``), written atomically."""
    lines = [
        "# Run config submitted by `fedmm coordinator submit` (flwr run --run-config FILE).",
        *(f"{key} = {_toml_value(value)}" for key, value in submission.run_config.items()),
    ]
    tmp = submission.config_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(submission.config_file)
    return submission.config_file


def training_shortfall(out_dir: Path, *, num_server_rounds: int) -> str | None:
    """Why a finished run trained fewer rounds than asked (a round in which no site trained
    leaves the model as it was), or ``None`` when every round trained."""
    metrics = out_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(line) for line in lines if line]
    trained = [r for r in rows if int(r.get("sites_trained", 0)) > 0 and not r.get("aborted")]
    if len(trained) >= num_server_rounds:
        return None
    untrained = [r for r in rows if r not in trained]
    reasons = "; ".join(
        f"round {r.get('round')}: "
        + (
            str(r["aborted"])
            if r.get("aborted")
            else f"{r.get('sites_refused', 0)} refused, {r.get('sites_failed', 0)} failed"
        )
        for r in untrained[:5]
    )
    return (
        f"sites trained in {len(trained)} of the {num_server_rounds} rounds asked"
        + (f" ({reasons})" if reasons else "")
        + ". The sites' refusal and error codes are in the run's log above (each site keeps "
        "the details in its own log)"
    )


def run_id_in(line: str) -> int | None:
    """The run id from ``flwr run``'s "Successfully started run N" line."""
    match = _RUN_ID.search(line)
    return int(match.group(1)) if match else None


def record_submission(out_dir: Path, *, run_id: int, connection: str, resume: bool) -> None:
    """Append the Flower run id to ``submissions.jsonl`` (one line per submission)."""
    entry = {"run_id": str(run_id), "connection": connection, "resume": resume}
    entry["submitted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (out_dir / SUBMISSIONS_LOG).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def submitted_run_ids(out_dir: Path) -> list[int]:
    path = out_dir / SUBMISSIONS_LOG
    if not path.exists():
        return []
    return [int(json.loads(line)["run_id"]) for line in path.read_text().splitlines() if line]


# --- the SuperLink's view of earlier submissions -------------------------------------------

ACTIVE_STATUSES = ("pending", "starting", "running")


def _flwr_json(argv: list[str], env: Mapping[str, str], *, timeout: float = 60.0) -> dict:
    """Run a ``flwr ... --format json`` command; its JSON object, or a SubmissionError."""
    import subprocess

    done = subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    start = done.stdout.find("{")
    try:
        data = json.JSONDecoder().raw_decode(done.stdout[start:])[0] if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if done.returncode != 0 or not data.get("success", False):
        detail = (str(data.get("error-message", "")) or done.stderr or done.stdout).strip()
        said = detail.splitlines()[-1] if detail else f"no answer (exit {done.returncode})"
        raise SubmissionError(
            f"`flwr {argv[1]} {argv[2]}` failed: {said} Is the SuperLink running, and are the "
            "connection's address and CA certificate right (fedmm coordinator add-connection)?"
        )
    return data


def check_superlink_reachable(connection: str, env: Mapping[str, str]) -> None:
    """The SuperLink answers on the connection (``flwr ls``), or a clear error."""
    _flwr_json([flower_executable("flwr"), "ls", connection, "--format", "json"], env)


def run_status(run_id: int, connection: str, env: Mapping[str, str]) -> str | None:
    """``pending``, ``running``, ``finished:failed``, ...; None when the SuperLink does not
    know the run (e.g. a SuperLink started without its database)."""
    argv = [flower_executable("flwr"), "ls", connection, "--run-id", str(run_id)]
    try:
        data = _flwr_json([*argv, "--format", "json"], env)
    except SubmissionError:
        return None
    runs = data.get("runs") or []
    return str(runs[0].get("status")) if runs else None


def stop_active_runs(
    out_dir: Path, connection: str, env: Mapping[str, str], *, timeout: float = 120.0
) -> list[int]:
    """Stop every earlier run of ``out_dir`` the SuperLink still runs (a ServerApp that
    outlived a restart would write to the same directory); returns the runs stopped."""
    import subprocess

    stopped = []
    for run_id in submitted_run_ids(out_dir):
        status = run_status(run_id, connection, env)
        if status is None or not status.startswith(ACTIVE_STATUSES):
            continue
        argv = [flower_executable("flwr"), "stop", str(run_id), connection]
        subprocess.run(argv, env=dict(env), capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + timeout
        while (status := run_status(run_id, connection, env)) and status.startswith(
            ACTIVE_STATUSES
        ):
            if time.monotonic() > deadline:
                raise SubmissionError(
                    f"run {run_id} of {out_dir} is still {status} after `flwr stop`: stop it "
                    "(or restart the SuperLink) before resuming"
                )
            time.sleep(1.0)
        stopped.append(run_id)
    return stopped
