"""Wall time of each stage of a SecAgg+ round in deployment, on loopback (prints JSON).

Starts what an operator and the sites start, through the ``fedmm`` commands: a CA, a
SuperLink with TLS and SuperNode authentication, ``--sites`` registered SuperNodes (each an
imagefolder of ``--records`` benchmark records, de-identified at the site, DP-SGD under a
policy of max-epsilon 8), then ``fedmm coordinator submit`` of ``--rounds`` rounds. The
ServerApp logs the wall time of each message exchange in ``metrics.jsonl``
(``secagg_stage_s``): from sending a stage's messages until the last reply, so it includes
the SuperNodes' polling and the fresh ClientApp process each SuperNode starts per message.
``train.secagg_setup`` trains; the other three stages must not import torch (target: at most
2 s each on 2 cores). The first round also pays one-time costs (FAB install at each site,
de-identifying the site's folder), so ``steady`` is the median over the later rounds.

It also times, in fresh processes, what a ClientApp process imports: Flower's
``flwr-clientapp`` entry point, then ``client.app`` on top, and whether torch comes with it.
Every process started is stopped by PID. Usage:

    python -m fedmm.simulations.benchmarks.deployment_benchmark                # 3 sites, 3 rounds
    python -m fedmm.simulations.benchmarks.deployment_benchmark --rounds 2 --records 60
    python -m fedmm.simulations.benchmarks.deployment_benchmark --compare-active

``--compare-active`` gives the sites a roster (pinned, not demanded) and runs the same rounds
again in active-coordinator mode (signed round keys, a consistency exchange before unmask):
``active_coordinator`` in the JSON has that run's stages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmm.simulations.loopback_daemons import (
    FEDMM,
    DaemonGroup,
    free_port,
    loopback_environment,
    run_command,
    start_loopback_superlink,
    wait_until,
)
from fedmm.simulations.simulated_roster import SimulatedRoster, write_simulated_roster

BIN = Path(sys.executable).parent
FLWR = str(BIN / "flwr")
NON_TRAINING_TARGET_S = 2.0
SITE_CONFIG = """[site]
name = "{name}"

[data]
imagefolder = "data"

[deidentification]
site-secret = "secrets/site-secret"
cache-dir = "cache"

[privacy]
max-epsilon = {max_epsilon}
delta = 1e-6
ledger-file = "state/privacy-ledger.json"

[supernode]
auth-private-key = "keys/site-auth-key"

[secure-aggregation]
min-threshold = 2
min-sites = 3
"""


def write_site(
    root: Path,
    *,
    name: str,
    offset: int,
    count: int,
    roster_lines: str = "",
    max_epsilon: float = 8.0,
) -> Path:
    """A site folder: ``count`` benchmark records as PNGs, key pair, config; the config.
    ``roster_lines`` go into its ``[secure-aggregation]`` table (the roster it pins);
    ``max_epsilon`` is its lifetime budget (each run asks for epsilon 8)."""
    from PIL import Image

    from fedmm.common.data.benchmark import benchmark_train_records

    records = benchmark_train_records(None)
    data = root / "data"
    data.mkdir(parents=True)
    lines = []
    for i in range(offset, offset + count):
        file_name = f"r{i:05d}.png"
        Image.fromarray(np.asarray(records.images[i])).save(data / file_name)
        lines.append(json.dumps({"file_name": file_name, "text": records.captions[i]}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    from fedmm.client.release_pin import installed_release

    release = installed_release()  # the site runs only the release installed here
    pin = f'\n[release]\nversion = "{release.version}"\ndigest = "{release.digest}"\n'
    config = root / "site.toml"
    site = SITE_CONFIG.format(name=name, max_epsilon=max_epsilon)
    config.write_text(site + roster_lines + pin)
    return config


def roster_lines(roster: SimulatedRoster, site: int) -> str:
    """The ``[secure-aggregation]`` lines of site ``site``: the roster file, the site's
    signing key and the pinned digest. The site does not demand the mode, so the same sites
    serve rounds with and without it. The keys are the simulation's
    (``simulations.simulated_roster``, seed 0: benchmark keys only; a deployed site makes its
    own with ``fedmm site roster-key``)."""
    return (
        f'roster-file = "{roster.roster_file}"\n'
        f'signing-key-file = "{roster.signing_key_file(site)}"\n'
        f'roster-digest = "{roster.digest.hex()}"\n'
    )


def _online(env: dict[str, str]) -> int:
    done = subprocess.run(
        [FLWR, "supernode", "list", "coordinator", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    start = done.stdout.find("{")
    if done.returncode != 0 or start < 0:
        return 0
    nodes = json.loads(done.stdout[start:]).get("nodes", [])
    return sum(1 for node in nodes if node.get("status") == "online")


def _import_seconds(code: str) -> float:
    """Wall time of a fresh Python that runs ``code`` (median of 3)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def clientapp_imports() -> dict[str, Any]:
    """What a ClientApp process spends importing, and whether torch is among it."""
    flower = "import flwr.supernode.cli.flwr_clientapp"
    ours = f"{flower}; import fedmm.client.app"
    probe = subprocess.run(
        [sys.executable, "-c", f"import sys; {ours}; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    return {
        "python_startup_s": _import_seconds("pass"),
        "flwr_clientapp_import_s": _import_seconds(flower),
        "flwr_clientapp_and_client_app_import_s": _import_seconds(ours),
        "client_app_imports_torch": probe.stdout.strip() == "True",
    }


def run_benchmark(
    directory: Path,
    *,
    sites: int,
    rounds: int,
    records: int,
    settings: list[str],
    compare_active: bool = False,
) -> dict[str, Any]:
    """Start the daemons, run ``rounds`` rounds; with ``compare_active``, run them again on
    the same sites in active-coordinator mode (``secagg-active-coordinator``). Returns the
    metrics rows of each submission by name (``secagg+``, ``active``)."""
    env = loopback_environment(directory)
    group = DaemonGroup(directory, env)
    try:
        superlink = start_loopback_superlink(directory, group)
        ca, address = superlink.ca, superlink.address
        roster = (
            write_simulated_roster(directory, num_sites=sites, seed=0) if compare_active else None
        )
        for index in range(sites):
            name = f"site-{index}"
            lines = "" if roster is None else roster_lines(roster, index)
            config = write_site(
                directory / name,
                name=name,
                offset=index * records,
                count=records,
                roster_lines=lines,
                max_epsilon=16.0 if compare_active else 8.0,  # a budget for each run
            )
            run_command(env, FEDMM, "site", "keygen", directory / name / "keys")
            run_command(
                env,
                FEDMM,
                "coordinator",
                "register-site",
                directory / name / "keys" / "site-auth-key.pub",
                "--connection",
                "coordinator",
            )
            group.start(
                name,
                [
                    FEDMM,
                    "site",
                    "start",
                    str(config),
                    "--superlink",
                    address,
                    "--ca-cert",
                    str(ca / "ca.crt"),
                    "--port",
                    str(free_port()),
                ],
            )
        if not wait_until(lambda: _online(env) == sites, timeout=120, interval=2):
            raise RuntimeError(f"only {_online(env)} of {sites} SuperNodes came online")
        group.remember_children()
        run_settings = [
            f"num-server-rounds={rounds}",
            f"min-available-sites={sites}",
            "min-train-sites=2",
            "epsilon=8.0",
            "batch-size=30",
            "learning-rate=1.0",
            "eval-single-items=200",
            "eval-scenes=100",
            "model-width=16",
            "model-heads=2",
            "round-timeout=300.0",
            "secagg-stage-timeout=120.0",
            *settings,
        ]
        runs = {"secagg+": run_settings}
        if roster is not None:
            runs["active"] = [
                *run_settings,
                "secagg-active-coordinator=true",
                f"secagg-roster-file={roster.roster_file}",
            ]
        results: dict[str, Any] = {}
        for label, these in runs.items():
            out = directory / f"run-{label.replace('+', 'plus')}"
            submit = [FEDMM, "coordinator", "submit", "--connection", "coordinator"]
            submit += ["--out-dir", str(out)]
            for setting in these:
                submit += ["--set", setting]
            started = time.monotonic()
            submitted = group.start(f"submit-{label}", submit)
            while submitted.process.poll() is None:
                group.remember_children()
                time.sleep(2.0)
            wall = time.monotonic() - started
            metrics = out / "metrics.jsonl"
            rows = (
                [json.loads(x) for x in metrics.read_text().splitlines()]
                if metrics.exists()
                else []
            )
            if submitted.process.returncode != 0 or len(rows) != rounds:
                raise RuntimeError(f"the {label} run did not finish:\n{submitted.output()[-3000:]}")
            results[label] = {"rows": rows, "submit_wall_s": round(wall, 1), "run_settings": these}
        return results
    finally:
        left = group.stop_all()
        if left:
            print(f"warning: processes still alive: {left}", file=sys.stderr)


def stage_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: the time of each round, and the median over rounds after the first."""
    stages: dict[str, Any] = {}
    for name in rows[0].get("secagg_stage_s", {}):
        per_round = [float(row["secagg_stage_s"][name]) for row in rows]
        later = per_round[1:] or per_round
        stages[name] = {"per_round_s": per_round, "steady_s": round(statistics.median(later), 3)}
    return stages


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A submission's stage times, round times and whether the stages that do not train
    met the target."""
    rows = run["rows"]
    stages = stage_figures(rows)
    non_training = {k: v["steady_s"] for k, v in stages.items() if not k.endswith("setup")}
    return {
        "stages": stages,
        "exchanges_per_round": len(stages),
        "round_wall_s": [row.get("wall_s") for row in rows],
        "sites_trained": [row.get("sites_trained") for row in rows],
        "submit_wall_s": run["submit_wall_s"],
        "non_training_within_target": all(
            v <= NON_TRAINING_TARGET_S for v in non_training.values()
        ),
        "run_settings": run["run_settings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=120, help="records per site")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    parser.add_argument(
        "--compare-active",
        action="store_true",
        help="run the rounds again on the same sites in active-coordinator mode",
    )
    args = parser.parse_args()
    options = {
        "sites": args.sites,
        "rounds": args.rounds,
        "records": args.records,
        "settings": args.set,
        "compare_active": args.compare_active,
    }
    if args.keep:
        args.keep.mkdir(parents=True)
        results = run_benchmark(args.keep, **options)
    else:
        with tempfile.TemporaryDirectory(prefix="fedmm-deploy-bench-") as tmp:
            results = run_benchmark(Path(tmp), **options)
    report: dict[str, Any] = {
        "benchmark": "deployment_stage_wall_time",
        "command": " ".join(
            ["python -m fedmm.simulations.benchmarks.deployment_benchmark", *sys.argv[1:]]
        ),
        "sites": args.sites,
        "rounds": args.rounds,
        "records_per_site": args.records,
        "tls_and_node_auth": True,
        "non_training_target_s": NON_TRAINING_TARGET_S,
    }
    report.update(run_figures(results["secagg+"]))
    if "active" in results:
        report["active_coordinator"] = run_figures(results["active"])
    report["clientapp_process"] = clientapp_imports()
    report["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
