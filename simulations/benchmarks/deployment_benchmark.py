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
max-epsilon = 8.0
delta = 1e-6
ledger-file = "state/privacy-ledger.json"

[supernode]
auth-private-key = "keys/site-auth-key"

[secure-aggregation]
min-threshold = 2
min-sites = 3
"""


def write_site(root: Path, *, name: str, offset: int, count: int) -> Path:
    """A site folder: ``count`` benchmark records as PNGs, key pair, config; the config."""
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
    config.write_text(SITE_CONFIG.format(name=name) + pin)
    return config


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
    directory: Path, *, sites: int, rounds: int, records: int, settings: list[str]
) -> dict[str, Any]:
    env = loopback_environment(directory)
    group = DaemonGroup(directory, env)
    try:
        superlink = start_loopback_superlink(directory, group)
        ca, address = superlink.ca, superlink.address
        for index in range(sites):
            name = f"site-{index}"
            config = write_site(directory / name, name=name, offset=index * records, count=records)
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
        out = directory / "run"
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
        submit = [FEDMM, "coordinator", "submit", "--connection", "coordinator", "--out-dir"]
        submit.append(str(out))
        for setting in run_settings:
            submit += ["--set", setting]
        started = time.monotonic()
        submitted = group.start("submit", submit)
        while submitted.process.poll() is None:
            group.remember_children()
            time.sleep(2.0)
        wall = time.monotonic() - started
        metrics = out / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if submitted.process.returncode != 0 or len(rows) != rounds:
            raise RuntimeError(f"the run did not finish:\n{submitted.output()[-3000:]}")
        return {"rows": rows, "submit_wall_s": round(wall, 1), "run_settings": run_settings}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=120, help="records per site")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True)
        result = run_benchmark(
            args.keep,
            sites=args.sites,
            rounds=args.rounds,
            records=args.records,
            settings=args.set,
        )
    else:
        with tempfile.TemporaryDirectory(prefix="fedmm-deploy-bench-") as tmp:
            result = run_benchmark(
                Path(tmp),
                sites=args.sites,
                rounds=args.rounds,
                records=args.records,
                settings=args.set,
            )
    rows = result["rows"]
    stages = stage_figures(rows)
    non_training = {k: v["steady_s"] for k, v in stages.items() if not k.endswith("setup")}
    print(
        json.dumps(
            {
                "benchmark": "deployment_stage_wall_time",
                "command": " ".join(
                    ["python -m fedmm.simulations.benchmarks.deployment_benchmark", *sys.argv[1:]]
                ),
                "sites": args.sites,
                "rounds": args.rounds,
                "records_per_site": args.records,
                "tls_and_node_auth": True,
                "stages": stages,
                "round_wall_s": [row.get("wall_s") for row in rows],
                "sites_trained": [row.get("sites_trained") for row in rows],
                "submit_wall_s": result["submit_wall_s"],
                "non_training_target_s": NON_TRAINING_TARGET_S,
                "non_training_within_target": all(
                    v <= NON_TRAINING_TARGET_S for v in non_training.values()
                ),
                "clientapp_process": clientapp_imports(),
                "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                "run_settings": result["run_settings"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
