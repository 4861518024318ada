"""The distributed-DP target: distributed DP (10 sites, epsilon 3) against centralised DP-SGD,
one recipe.

Runs, one after the other (each in a subprocess, the machine's cores to itself):

1. ``fedmm simulate --dp distributed``: T rounds, each one DP-SGD step on the union of the
   sites' records at sampling rate q (Skellam shares under SecAgg+), evaluated every
   ``--eval-every`` rounds;
2. ``python -m fedmm.simulations.centralised_reference``: the same model, loss, clip, learning rate,
   sampling rate q and number of steps T (= T q epochs with batch size q N) on the pooled
   records, with Opacus' Gaussian noise calibrated to the same epsilon by its RDP accountant.

Prints one JSON object: both accuracies (final and best), the gap in points, wall times, the
noise multipliers and the privacy statement. Example (the figures in docs/results.md):

    python -m fedmm.simulations.benchmarks.distributed_dp_target \\
        --rounds 196 --sampling-rate 0.0357142857
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from fedmm.common.distributed_dp.plan import plan_distributed_dp
from fedmm.common.federation_config import FederationConfig

TRAIN_RECORDS = 54_000  # the built-in benchmark's training split (10 sites x 5,400)


def _run(command: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=392)
    parser.add_argument("--sampling-rate", type=float, default=1 / 28)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--eval-every", type=int, default=28)
    parser.add_argument("--out", type=Path, default=Path("runs/distributed-dp-target"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-central", action="store_true")
    parser.add_argument("--skip-distributed", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = dict(pair.split("=", 1) for pair in args.set)
    config = FederationConfig.from_run_config(
        {**overrides, "dp-mode": "distributed", "dp-sampling-rate": args.sampling_rate}
    )
    result: dict = {
        "sites": args.sites,
        "epsilon": args.epsilon,
        "delta": config.delta,
        "rounds": args.rounds,
        "sampling_rate": args.sampling_rate,
        "learning_rate": config.learning_rate,
        "clip": config.max_grad_norm,
        "set": overrides,
    }
    if not args.skip_distributed:
        run_dir = args.out / "distributed"
        command = [
            sys.executable, "-m", "fedmm.simulations.cli", "simulate", "--quiet",
            "--dp", "distributed", "--sites", str(args.sites), "--rounds", str(args.rounds),
            "--epsilon", str(args.epsilon), "--out", str(run_dir),
            "--set", f"dp-sampling-rate={args.sampling_rate}",
            "--set", f"eval-every={args.eval_every}",
        ]  # fmt: skip
        for pair in args.set:
            command += ["--set", pair]
        wall = _run(command, args.out / "distributed.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["distributed"] = {
            "command": " ".join(command[1:]),
            "final_accuracy": summary["final"].get("accuracy"),
            "best_accuracy": summary["best_accuracy"],
            "epsilon_bound_reported": summary["final"].get("epsilon_bound_max"),
            "rounds_aborted": sum(1 for row in rows if row.get("aborted")),
            "wall_s": round(wall, 1),
            "privacy": summary["privacy"],
        }
    if not args.skip_central:
        batch = math.ceil(args.sampling_rate * TRAIN_RECORDS)
        epochs = round(args.rounds * args.sampling_rate)
        command = [
            sys.executable, "-m", "fedmm.simulations.centralised_reference",
            "--epochs", str(epochs), "--epsilon", str(args.epsilon), "--threads", "1",
            "--set", f"batch-size={batch}",
        ]  # fmt: skip
        for pair in args.set:
            command += ["--set", pair]
        log = args.out / "central.log"
        wall = _run(command, log)
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        result["central"] = {
            "command": " ".join(command[1:]),
            "batch_size": batch,
            "sample_rate": 1 / math.ceil(TRAIN_RECORDS / batch),
            "steps": epochs * math.ceil(TRAIN_RECORDS / batch),
            "noise_multiplier": rows[-1]["noise_multiplier"],
            "final_accuracy": rows[-1]["accuracy"],
            "best_accuracy": max(row["accuracy"] for row in rows),
            "epsilon": rows[-1]["epsilon"],
            "wall_s": round(wall, 1),
        }
    if "distributed" in result:
        from fedmm.common.model import CrossAttentionMatcher
        from fedmm.common.train_request import model_config_of

        model = CrossAttentionMatcher(model_config_of(config))
        plan = plan_distributed_dp(
            epsilon=args.epsilon,
            delta=config.delta,
            sample_rate=args.sampling_rate,
            num_rounds=args.rounds,
            clip_norm=config.max_grad_norm,
            dimension=sum(p.numel() for p in model.parameters() if p.requires_grad),
            min_honest_sites=config.dp_min_honest_sites or args.sites,
        )
        result["distributed"]["noise_multiplier"] = round(
            plan.noise_multiplier(plan.min_honest_sites), 4
        )
    if "distributed" in result and "central" in result:
        final_d = result["distributed"]["final_accuracy"]
        final_c = result["central"]["final_accuracy"]
        result["gap_points_final"] = round(100 * (final_c - final_d), 2)
        result["targets"] = {
            "within_2_points_of_central": abs(final_c - final_d) <= 0.02,
            "at_least_80_percent": final_d >= 0.80,
            "wall_time_at_most_30_min": result["distributed"]["wall_s"] <= 1800,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
