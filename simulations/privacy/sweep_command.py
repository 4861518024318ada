"""``fedmm privacy-sweep``: the privacy-utility sweep from the command line (``sweep``)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmm.common.cli_arguments import epsilon, key_value_pairs, number
from fedmm.common.data.partitioning import PARTITION_SCHEMES
from fedmm.common.federation_config import OPTIMIZERS

if TYPE_CHECKING:
    from fedmm.simulations.privacy.sweep import SweepSettings


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_privacy_sweep_parser(commands: Any) -> None:
    """Register ``privacy-sweep`` on the ``fedmm`` subcommands."""
    sweep = commands.add_parser(
        "privacy-sweep",
        help="privacy-utility sweep: federated runs at several epsilons, attacked by "
        "membership inference (loss threshold, offline LiRA)",
        description="For each partition and epsilon: a federated run (fedmm simulate) with "
        "every site capped at --records-per-site records (the rest of each partition is held "
        "out of all training), every site's epsilon cross-checked with dp-accounting, and "
        "membership inference on the final global model against site --target-site's "
        "records: a global loss threshold and offline LiRA with --shadows shadow "
        "federations trained on held-out records of the other sites. Then a non-private "
        "point trained to overfit, and the same recipe at any further --overfit-epsilons. "
        "Then the one-run audit (--audit-*): canaries inserted at the sites, one run per "
        "epsilon, an empirical epsilon lower bound from the attack's guesses; then its "
        "white-box twin (--gradient-audit-*): gradient canaries in a site's DP-SGD steps. "
        "Writes privacy-sweep.md/.json and PNG plots to --out; run again with the same --out "
        "to reuse finished points. See docs/privacy-report.md.",
    )
    sweep.add_argument(
        "--epsilons", nargs="+", type=epsilon, default=None, help="(inf 8 3 1)", metavar="E"
    )
    sweep.add_argument(
        "--partitions", nargs="+", choices=PARTITION_SCHEMES, default=None, help="(iid dirichlet)"
    )
    sweep.add_argument("--sites", type=_positive, default=10, help="simulated sites (10)")
    sweep.add_argument("--rounds", type=_positive, default=3, help="server rounds (3)")
    sweep.add_argument(
        "--records-per-site",
        type=_positive,
        default=300,
        help="records each site trains on (300)",
    )
    sweep.add_argument("--shadows", type=int, default=4, help="LiRA shadow federations (4)")
    sweep.add_argument("--queries", type=_positive, default=2, help="queries per record (2)")
    sweep.add_argument("--target-site", type=int, default=0, help="whose records are attacked (0)")
    sweep.add_argument("--max-targets", type=_positive, help="cap on members (= non-members)")
    sweep.add_argument("--workers", type=_positive, default=2, help="shadow training processes (2)")
    sweep.add_argument("--seed", type=int, default=0, help="attack seed (0)")
    sweep.add_argument("--no-overfit", action="store_true", help="skip the overfit point")
    sweep.add_argument(
        "--overfit-records-per-site", type=_positive, default=200, help="overfit point (200)"
    )
    sweep.add_argument(
        "--overfit-local-epochs", type=_positive, default=20, help="overfit point (20)"
    )
    sweep.add_argument("--overfit-rounds", type=_positive, default=10, help="overfit point (10)")
    sweep.add_argument("--overfit-sites", type=_positive, default=2, help="overfit point (2)")
    sweep.add_argument(
        "--overfit-batch-size", type=_positive, default=32, help="overfit point (32)"
    )
    sweep.add_argument(
        "--overfit-optimizer", choices=OPTIMIZERS, default="adam", help="overfit point (adam)"
    )
    sweep.add_argument(
        "--overfit-learning-rate",
        type=_positive_float,
        default=0.005,
        help="overfit point, DP or not (0.005)",
    )
    sweep.add_argument(
        "--overfit-epsilons",
        nargs="+",
        type=epsilon,
        default=[math.inf],
        metavar="E",
        help="the overfit recipe at these epsilons (inf): e.g. inf 8 3 1 shows whether DP "
        "suppresses the leak the non-private point has",
    )
    sweep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run config key for every run, e.g. --set eval-single-items=2000",
    )
    sweep.add_argument(
        "--set-non-private",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a run config key for the epsilon = inf points only (learning-rate=0.5: "
        "unclipped SGD at the DP learning rate diverges)",
    )
    sweep.add_argument(
        "--set-overfit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run config key for the overfit points only, after --set (e.g. "
        "model-image-encoder=scatter)",
    )
    sweep.add_argument(
        "--audit-canaries",
        type=int,
        default=1000,
        help="one-run audit (Steinke et al., NeurIPS 2023): canaries inserted at the sites, "
        "each included with probability 1/2; 0 = no audit points (1000)",
    )
    sweep.add_argument(
        "--audit-epsilons",
        nargs="+",
        type=epsilon,
        default=None,
        metavar="E",
        help="epsilons of the audit points, black-box and white-box (the sweep's --epsilons)",
    )
    sweep.add_argument(
        "--audit-confidence",
        type=float,
        default=0.95,
        help="confidence of the audit's epsilon lower bound (0.95)",
    )
    sweep.add_argument(
        "--set-audit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run config key for the audit points only, after --set and --set-non-private",
    )
    sweep.add_argument(
        "--audit-only",
        action="store_true",
        help="train only the audit points (no membership-inference points)",
    )
    sweep.add_argument(
        "--gradient-audit-canaries",
        type=int,
        default=1000,
        help="white-box one-run audit after the audit points: Dirac gradient canaries in "
        "site 0's DP-SGD steps at the audit points' recipe and epsilons (1000)",
    )
    sweep.add_argument(
        "--no-gradient-audit",
        action="store_true",
        help="skip the white-box audit points",
    )
    sweep.add_argument("--out", type=Path, help="output folder (runs/privacy-sweep-<UTC time>)")


def sweep_settings(args: argparse.Namespace) -> SweepSettings:
    """The sweep's settings from the parsed options; ValueError names a bad option."""
    from fedmm.simulations.privacy.sweep import (
        DEFAULT_EPSILONS,
        SWEEP_MODEL,
        OverfitSettings,
        SweepSettings,
    )

    # The report's recipe: the patch model, whatever `fedmm simulate`'s benchmark default
    # (an encoder named here keeps the run config's clip and learning rate: --set them too).
    run_config = {**SWEEP_MODEL, **key_value_pairs(args.set, option="--set")}
    non_private = (
        {"learning-rate": "0.5"}
        if args.set_non_private is None
        else key_value_pairs(args.set_non_private, option="--set-non-private")
    )
    overfit = None
    if not args.no_overfit:
        overfit = OverfitSettings(
            records_per_site=args.overfit_records_per_site,
            local_epochs=args.overfit_local_epochs,
            rounds=args.overfit_rounds,
            sites=args.overfit_sites,
            batch_size=args.overfit_batch_size,
            optimizer=args.overfit_optimizer,
            learning_rate=args.overfit_learning_rate,
            epsilons=tuple(args.overfit_epsilons),
            run_config=key_value_pairs(args.set_overfit, option="--set-overfit"),
        )
    if args.shadows < 2:
        raise ValueError(f"--shadows must be at least 2 (offline LiRA), got {args.shadows}")
    if not 0 <= args.target_site < args.sites:
        raise ValueError(f"--target-site must be in [0, {args.sites - 1}]")
    audit = None
    if args.audit_canaries:
        from fedmm.simulations.privacy.audit_run import AuditSettings

        audit = AuditSettings(
            canaries=args.audit_canaries,
            epsilons=tuple(args.audit_epsilons or args.epsilons or DEFAULT_EPSILONS),
            confidence=args.audit_confidence,
            run_config=key_value_pairs(args.set_audit, option="--set-audit"),
        )
    elif args.audit_only and args.no_gradient_audit:
        raise ValueError("--audit-only needs --audit-canaries of at least 2 or the white-box audit")
    gradient_audit = None
    if not args.no_gradient_audit:
        from fedmm.simulations.privacy.audit_run import GradientAuditSettings

        gradient_audit = GradientAuditSettings(
            canaries=args.gradient_audit_canaries,
            epsilons=tuple(args.audit_epsilons or args.epsilons or DEFAULT_EPSILONS),
            confidence=args.audit_confidence,
        )
    return SweepSettings(
        gradient_audit=gradient_audit,
        audit=audit,
        audit_only=args.audit_only,
        **({"epsilons": tuple(args.epsilons)} if args.epsilons else {}),
        **({"partitions": tuple(args.partitions)} if args.partitions else {}),
        sites=args.sites,
        rounds=args.rounds,
        records_per_site=args.records_per_site,
        shadows=args.shadows,
        queries=args.queries,
        target_site=args.target_site,
        max_targets=args.max_targets,
        workers=args.workers,
        seed=args.seed,
        overfit=overfit,
        run_config=run_config,
        non_private_run_config=non_private,
    )


def run_privacy_sweep(args: argparse.Namespace) -> int:
    """Run the sweep; 0 when the report is written, 2 on bad options."""
    from fedmm.simulations.privacy.sweep import run_sweep

    try:
        settings = sweep_settings(args)
    except ValueError as error:
        print(f"fedmm privacy-sweep: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / datetime.now(UTC).strftime("privacy-sweep-%Y%m%d-%H%M%S")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    progress = logging.getLogger("fedmm.simulations.privacy")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False  # other libraries configure the root logger too
    run_sweep(settings, out)
    print(f"privacy sweep written to {out.resolve()} (privacy-sweep.md, .json, PNG plots)")
    return 0
