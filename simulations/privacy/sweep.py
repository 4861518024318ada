"""The privacy-utility sweep: federated runs at several epsilons and partitions, each
attacked by membership inference.

For every (partition, epsilon) point, ``fedmm simulate`` trains the global model with every
site capped at ``records_per_site`` records (the rest of each partition is held out of all
training, for non-members and the attacker's shadow data: ``membership_split``); then the
loss-threshold attack and offline LiRA (Carlini et al., IEEE S&P 2022) attack site
``target_site``'s records, and every site's epsilon is cross-checked with Google's
``dp-accounting`` (``epsilon_cross_check``). An extra non-private point trained to overfit
(few records per site, many local epochs) shows that the attacks work where they should.
Each finished point is saved in ``<out>/points/<name>.json``; running the sweep again into
the same folder reuses finished points and finished federated runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmm.common.data.partitioning import PARTITION_SCHEMES
from fedmm.common.federation_config import OPTIMIZERS
from fedmm.simulations.privacy.audit_run import AuditSettings, GradientAuditSettings
from fedmm.simulations.privacy.epsilon_cross_check import SiteEpsilon, cross_check_ledgers
from fedmm.simulations.privacy.federated_run import (
    FederatedRunError,
    FederatedRunResult,
    FederatedRunSpec,
    simulate_in_child_process,
)
from fedmm.simulations.privacy.membership_experiment import (
    AttackSettings,
    read_run_config,
    run_membership_experiment,
)

logger = logging.getLogger(__name__)

DEFAULT_EPSILONS = (math.inf, 8.0, 3.0, 1.0)
DEFAULT_PARTITIONS = ("iid", "dirichlet")


# Run config keys the sweep sets itself, from its own options.
SWEEP_RESERVED_KEYS = (
    "site-records-limit",
    "num-server-rounds",
    "epsilon",
    "partition",
    "eval-fraction",
    "federated-eval",
)
#: Every one of a site's first records-per-site records is a member (trained on): no record
#: is held out for federated evaluation in the attacked runs.
NO_HELD_OUT = {"eval-fraction": "0", "federated-eval": "false"}


def _check_epsilons(epsilons: tuple[float, ...], *, what: str) -> None:
    """At least one epsilon, each > 0 or inf; ValueError names ``what`` and the bad values."""
    bad = [e for e in epsilons if not (e > 0 or math.isinf(e))]
    if bad or not epsilons:
        raise ValueError(f"{what} must be > 0 or inf, got {bad or list(epsilons)}")


@dataclass(frozen=True)
class SweepPoint:
    """One federated run of the sweep."""

    name: str
    partition: str
    epsilon: float
    rounds: int
    records_per_site: int
    run_config: dict[str, str]
    sites: int
    overfit: bool = False
    audit: bool = False  # a one-run audit point: canaries at the sites (audit_run)
    #: a white-box one-run audit point: gradient canaries in site 0's DP-SGD steps
    #: (gradient_canary_audit); no federated run
    gradient_audit: bool = False


@dataclass(frozen=True)
class OverfitSettings:
    """The points trained to overfit: few records per site, many local epochs.

    The non-private one (epsilon inf) shows that the attacks work; the same recipe at finite
    epsilons shows whether DP-SGD suppresses the leak that recipe has (only DP changes
    between them: same sites, records, epochs, batch size, optimizer and learning rate).
    The defaults (Adam at 0.005, 10 rounds) bring the local training loss to about 0.1;
    SGD at 0.5 over 3 rounds left it at 0.74 and the attacks' AUCs near 0.6
    (docs/privacy-report.md).
    """

    sites: int = 2  # FedAvg over many sites averages memorisation away
    # Two sites cannot run secure aggregation (a sum over two reveals each to the other), and
    # the point measures what the released model memorises, which secure aggregation does not
    # change: its runs use plain FedAvg unless --set-overfit secure-aggregation=true.
    records_per_site: int = 200
    local_epochs: int = 20
    rounds: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 0.005
    epsilons: tuple[float, ...] = (math.inf,)
    run_config: dict[str, str] = field(default_factory=dict)  # --set-overfit pairs

    def __post_init__(self) -> None:
        _check_epsilons(self.epsilons, what="overfit epsilons")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"overfit optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        reserved = {
            "local-epochs",
            "batch-size",
            "optimizer",
            "learning-rate",
            *SWEEP_RESERVED_KEYS,
        }
        clash = sorted(reserved & set(self.run_config))
        if clash:
            raise ValueError(f"{clash} are set by the overfit options; use those instead")


#: The model of the sweep's recipe (docs/privacy-report.md, "The sweep's recipe"): the patch
#: image encoder its points were measured with, not the scattering readout `fedmm simulate`
#: trains on the benchmark by default.
SWEEP_MODEL = {"model-image-encoder": "patches"}


@dataclass(frozen=True)
class SweepSettings:
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    partitions: tuple[str, ...] = DEFAULT_PARTITIONS
    sites: int = 10
    rounds: int = 3
    records_per_site: int = 300
    shadows: int = 4
    queries: int = 2
    target_site: int = 0
    max_targets: int | None = None
    workers: int = 2
    seed: int = 0
    overfit: OverfitSettings | None = field(default_factory=OverfitSettings)
    run_config: dict[str, str] = field(default_factory=dict)  # --set pairs for every run
    # added at epsilon = inf only: unclipped SGD at the DP learning rate diverges
    non_private_run_config: dict[str, str] = field(default_factory=lambda: {"learning-rate": "0.5"})
    run_timeout_s: float = 3600.0
    run_attempts: int = 3
    #: The one-run audit points (None: none); ``audit_only`` trains nothing else.
    audit: AuditSettings | None = field(default_factory=AuditSettings)
    audit_only: bool = False
    #: The white-box audit points (None: none), after the black-box ones.
    gradient_audit: GradientAuditSettings | None = field(default_factory=GradientAuditSettings)

    def __post_init__(self) -> None:
        if not self.epsilons:
            raise ValueError("the sweep needs at least one epsilon")
        _check_epsilons(self.epsilons, what="epsilons")
        unknown = [p for p in self.partitions if p not in PARTITION_SCHEMES]
        if unknown or not self.partitions:
            raise ValueError(f"partitions must be among {PARTITION_SCHEMES}, got {unknown}")
        if self.sites < 2:
            raise ValueError(f"the sweep needs at least 2 sites, got {self.sites}")
        if self.rounds < 1 or self.records_per_site < 1:
            raise ValueError("rounds and records_per_site must be at least 1")
        clash = sorted(
            set(SWEEP_RESERVED_KEYS) & (set(self.run_config) | set(self.non_private_run_config))
        )
        if clash:
            raise ValueError(f"{clash} are set by the sweep itself; use its own options")
        if self.audit_only and self.audit is None and self.gradient_audit is None:
            raise ValueError("audit_only needs black-box or white-box audit settings")
        if self.audit is not None:
            clash = sorted(set(SWEEP_RESERVED_KEYS) & set(self.audit.run_config))
            if clash:
                raise ValueError(f"{clash} are set by the sweep itself; use its own options")

    def audit_points(self) -> list[SweepPoint]:
        """The one-run audit points: the sweep's recipe with canaries, at each audit epsilon."""
        if self.audit is None:
            return []
        return [
            SweepPoint(
                name=f"audit-{self.audit.partition}-eps-{_epsilon_name(epsilon)}",
                partition=self.audit.partition,
                epsilon=epsilon,
                rounds=self.rounds,
                records_per_site=self.records_per_site,
                run_config={
                    **self.run_config,
                    **(self.non_private_run_config if math.isinf(epsilon) else {}),
                    **self.audit.run_config,
                },
                sites=self.sites,
                audit=True,
            )
            for epsilon in self.audit.epsilons
        ]

    def gradient_audit_points(self) -> list[SweepPoint]:
        """The white-box audit points: the audit points' recipe, gradient canaries in site
        0's DP-SGD steps, at each epsilon of the white-box audit (default: the audit's)."""
        if self.gradient_audit is None:
            return []
        epsilons = self.gradient_audit.epsilons or (
            self.audit.epsilons if self.audit else self.epsilons
        )
        _check_epsilons(epsilons, what="white-box audit epsilons")
        partition = self.audit.partition if self.audit else "iid"
        return [
            SweepPoint(
                name=f"whitebox-{partition}-eps-{_epsilon_name(epsilon)}",
                partition=partition,
                epsilon=epsilon,
                rounds=self.rounds,
                records_per_site=self.records_per_site,
                run_config={
                    **self.run_config,
                    **(self.non_private_run_config if math.isinf(epsilon) else {}),
                    **(self.audit.run_config if self.audit else {}),
                },
                sites=self.sites,
                gradient_audit=True,
            )
            for epsilon in epsilons
        ]

    def points(self) -> list[SweepPoint]:
        """The federated runs, in order: each partition at each epsilon, then the overfit ones,
        then the audit points, black-box then white-box (only these with ``audit_only``)."""
        if self.audit_only:
            return self.audit_points() + self.gradient_audit_points()
        points = [
            SweepPoint(
                name=f"{partition}-eps-{_epsilon_name(epsilon)}",
                partition=partition,
                epsilon=epsilon,
                rounds=self.rounds,
                records_per_site=self.records_per_site,
                run_config={
                    **self.run_config,
                    **(self.non_private_run_config if math.isinf(epsilon) else {}),
                },
                sites=self.sites,
            )
            for partition in self.partitions
            for epsilon in self.epsilons
        ]
        if self.overfit is not None:
            o = self.overfit
            points += [
                SweepPoint(
                    name=f"overfit-iid-eps-{_epsilon_name(epsilon)}",
                    partition="iid",
                    epsilon=epsilon,
                    rounds=o.rounds,
                    records_per_site=o.records_per_site,
                    run_config={
                        **self.run_config,
                        "secure-aggregation": "false",
                        "local-epochs": str(o.local_epochs),
                        "batch-size": str(o.batch_size),
                        "optimizer": o.optimizer,
                        "learning-rate": str(o.learning_rate),
                        **o.run_config,
                    },
                    sites=o.sites,
                    overfit=True,
                )
                for epsilon in o.epsilons
            ]
        return points + self.audit_points() + self.gradient_audit_points()


def _epsilon_name(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _run_with_retries(
    spec: FederatedRunSpec, run_dir: Path, settings: SweepSettings
) -> FederatedRunResult:
    """``simulate_in_child_process``, again (in a fresh folder) when a run fails: on a shared
    machine a Ray actor can be lost to causes outside the run; the failed attempt is kept
    beside."""
    for attempt in range(1, settings.run_attempts + 1):
        try:
            return simulate_in_child_process(spec, run_dir, timeout_s=settings.run_timeout_s)
        except FederatedRunError as error:
            if attempt == settings.run_attempts:
                raise
            kept = run_dir.with_name(f"{run_dir.name}.failed-{attempt}")
            logger.warning("%s; attempt %d failed, kept in %s, retrying", error, attempt, kept)
            run_dir.rename(kept)
            log = run_dir.with_suffix(".log")
            if log.exists():
                log.rename(kept.with_suffix(".log"))
    raise AssertionError("unreachable")


def run_point(point: SweepPoint, settings: SweepSettings, out: Path) -> dict[str, Any]:
    """Train, cross-check epsilon, attack; the point's result (also written as JSON)."""
    if point.audit:
        return run_audit_point(point, settings, out)
    if point.gradient_audit:
        return run_gradient_audit_point(point, settings, out)
    result_file = out / "points" / f"{point.name}.json"
    spec = FederatedRunSpec(
        sites=point.sites,
        rounds=point.rounds,
        epsilon=point.epsilon,
        partition=point.partition,
        run_config={
            **point.run_config,
            **NO_HELD_OUT,
            "site-records-limit": str(point.records_per_site),
        },
    )
    made_with = _jsonable(
        {
            "run": _spec_record(spec),
            "attack": {
                k: getattr(settings, k)
                for k in ("shadows", "queries", "target_site", "max_targets", "seed")
            },
        }
    )
    earlier = _earlier_result(result_file, made_with, point.name)
    if earlier is not None:
        return earlier
    logger.info("%s: federated training (%d sites, %d rounds)", point.name, spec.sites, spec.rounds)
    run, epsilons = _train_point(point, spec, out, settings)
    final = run.summary.get("final", {})
    membership = run_membership_experiment(
        run.out,
        AttackSettings(
            num_sites=point.sites,
            shadows=settings.shadows,
            queries=settings.queries,
            target_site=settings.target_site,
            max_targets=settings.max_targets,
            workers=settings.workers,
            seed=settings.seed,
        ),
    )
    result = {
        "name": point.name,
        "partition": point.partition,
        "epsilon_target": point.epsilon,
        "overfit": point.overfit,
        "records_per_site": point.records_per_site,
        "run_config": spec.run_config,
        "rounds": int(run.summary.get("rounds", 0)),
        "accuracy": final.get("accuracy"),
        "r_at_1_i2t": final.get("r_at_1_i2t"),
        "r_at_1_t2i": final.get("r_at_1_t2i"),
        "sites_trained_last_round": final.get("sites_trained"),
        "train_wall_s": round(run.wall_s, 1),
        "attack_wall_s": round(membership.wall_s, 1),
        "site_epsilons": [asdict(e) for e in epsilons],
        "epsilon_max": max((e.opacus_rdp for e in epsilons), default=math.inf),
        "delta": epsilons[0].delta if epsilons else None,
        "membership": {
            "target_site": membership.target_site,
            "num_members": membership.num_members,
            "num_non_members": membership.num_non_members,
            "shadow_pool": membership.shadow_pool,
            "trained_records": membership.trained_records,
            "shadow_accuracy": membership.shadow_accuracy,
            "attacks": [asdict(s) for s in membership.summaries],
            "roc": {
                name: {"fpr": curve.fpr.tolist(), "tpr": curve.tpr.tolist()}
                for name, curve in membership.curves.items()
            },
        },
        "run_dir": str(run.out),
        "made_with": made_with,
    }
    return _write_result(result_file, result)


def _train_point(
    point: SweepPoint, spec: FederatedRunSpec, out: Path, settings: SweepSettings
) -> tuple[FederatedRunResult, list[SiteEpsilon]]:
    """The point's federated run and its sites' epsilons, recomputed from their ledgers
    (every site of a DP point must have one)."""
    run = _run_with_retries(spec, out / "runs" / point.name, settings)
    final = run.summary.get("final", {})
    logger.info("%s: trained in %.0f s, accuracy %s", point.name, run.wall_s, final.get("accuracy"))
    epsilons = cross_check_ledgers(run.out / "site-ledgers")
    if math.isfinite(point.epsilon) and len(epsilons) != point.sites:
        raise RuntimeError(f"{point.name}: {len(epsilons)} of {point.sites} sites have a DP ledger")
    return run, epsilons


def _earlier_result(result_file: Path, made_with: Any, name: str) -> dict[str, Any] | None:
    """A point's result from an earlier sweep into the same ``--out`` (None: none yet);
    one made with other settings is refused, naming the fix."""
    if not result_file.exists():
        return None
    earlier = json.loads(result_file.read_text())
    if earlier.get("made_with", made_with) != made_with:
        raise ValueError(
            f"{result_file} was made with other settings ({earlier.get('made_with')}); "
            "use a new --out for these settings"
        )
    logger.info("%s: finished earlier, reusing %s", name, result_file)
    return earlier


def _write_result(result_file: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write a point's result as JSON; the result as it reads back (JSON types)."""
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(_jsonable(result)))
    return json.loads(result_file.read_text())


def _spec_record(spec: FederatedRunSpec) -> dict[str, Any]:
    """What a point was made with (a benchmark run's record has no ``site_data``)."""
    record = asdict(spec)
    if not record["site_data"]:
        del record["site_data"]
    return record


def run_audit_point(point: SweepPoint, settings: SweepSettings, out: Path) -> dict[str, Any]:
    """Canaries at the sites, one federated run, the one-run audit's empirical epsilon; the
    point's result (also written as JSON)."""
    from fedmm.simulations.privacy.audit_run import (
        audit_result,
        audited_run_config,
        prepare_canary_sites,
        score_canaries,
    )

    audit = settings.audit
    if audit is None:
        raise ValueError(f"{point.name} is an audit point but the sweep has no audit settings")
    result_file = out / "points" / f"{point.name}.json"
    point_dir = out / "audit" / point.name
    run_config = audited_run_config(
        {**point.run_config, **NO_HELD_OUT, "partition": point.partition}
    )
    made_with = _jsonable(
        {
            "run": {
                "sites": point.sites,
                "rounds": point.rounds,
                "epsilon": point.epsilon,
                "partition": point.partition,
                "run_config": run_config,
                "records_per_site": point.records_per_site,
            },
            "audit": {
                "canaries": audit.canaries,
                "confidence": audit.confidence,
                "score": "margin of the wrong caption over the true class caption",
            },
        }
    )
    earlier = _earlier_result(result_file, made_with, point.name)
    if earlier is not None:
        return earlier
    folders = prepare_canary_sites(
        point_dir,
        run_config=run_config,
        num_sites=point.sites,
        partition=point.partition,
        records_per_site=point.records_per_site,
        canaries=audit.canaries,
    )
    del run_config["partition"]  # given to fedmm simulate as --partition
    spec = FederatedRunSpec(
        sites=point.sites,
        rounds=point.rounds,
        epsilon=point.epsilon,
        partition=point.partition,
        run_config=run_config,
        site_data=tuple(str(f) for f in folders),
    )
    logger.info("%s: federated training with %d canaries", point.name, audit.canaries)
    run, epsilons = _train_point(point, spec, out, settings)
    final = run.summary.get("final", {})
    # the delta the audit tests: the sites' (from their ledgers), else the run's
    delta = epsilons[0].delta if epsilons else read_run_config(run.out).delta
    scores = score_canaries(run.out, point_dir)
    result = {
        "name": point.name,
        "partition": point.partition,
        "epsilon_target": point.epsilon,
        "audit": audit_result(scores, delta=delta, confidence=audit.confidence),
        "records_per_site": point.records_per_site,
        "run_config": spec.run_config,
        "rounds": int(run.summary.get("rounds", 0)),
        "accuracy": final.get("accuracy"),
        "train_wall_s": round(run.wall_s, 1),
        "site_epsilons": [asdict(e) for e in epsilons],
        "epsilon_max": max((e.opacus_rdp for e in epsilons), default=math.inf),
        "delta": delta,
        "canary_scores": asdict(scores),
        "run_dir": str(run.out),
        "made_with": made_with,
    }
    written = _write_result(result_file, result)
    logger.info(
        "%s: empirical epsilon %.3f at %.0f%% confidence (accounted %s)",
        point.name,
        result["audit"]["epsilon_lower_bound"],
        100 * audit.confidence,
        result["epsilon_max"],
    )
    return written


def run_gradient_audit_point(
    point: SweepPoint, settings: SweepSettings, out: Path
) -> dict[str, Any]:
    """The white-box one-run audit of site 0's DP-SGD steps at the point's recipe
    (``gradient_canary_audit``); the point's result (also written as JSON)."""
    from fedmm.simulations.privacy.audit_run import audited_run_config
    from fedmm.simulations.privacy.canaries import KEY_FILE, load_or_create_key
    from fedmm.simulations.privacy.gradient_canary_audit import SCORE, audit_site_recipe

    audit = settings.gradient_audit
    if audit is None:
        raise ValueError(f"{point.name} is a white-box audit point but the sweep has none")
    result_file = out / "points" / f"{point.name}.json"
    run_config = audited_run_config({**point.run_config, "partition": point.partition})
    made_with = _jsonable(
        {
            "run": {
                "sites": point.sites,
                "rounds": point.rounds,
                "epsilon": point.epsilon,
                "run_config": run_config,
                "records_per_site": point.records_per_site,
            },
            "gradient_audit": {
                "canaries": audit.canaries,
                "confidence": audit.confidence,
                "score": SCORE,
            },
        }
    )
    earlier = _earlier_result(result_file, made_with, point.name)
    if earlier is not None:
        return earlier
    logger.info("%s: DP-SGD with %d gradient canaries", point.name, audit.canaries)
    run = audit_site_recipe(
        run_config,
        epsilon=point.epsilon,
        sites=point.sites,
        rounds=point.rounds,
        records_per_site=point.records_per_site,
        canaries=audit.canaries,
        confidence=audit.confidence,
        key=load_or_create_key(out / "audit" / point.name / KEY_FILE),
    )
    record = run.as_json()
    scores = {"scores": record.pop("scores"), "included": record.pop("included")}
    result = {
        "name": point.name,
        "partition": point.partition,
        "gradient_audit": record,
        "canary_scores": scores,
        "made_with": made_with,
    }
    written = _write_result(result_file, result)
    logger.info(
        "%s: empirical epsilon %.3f at %.0f%% confidence (accounted %s, at most %.3f "
        "certifiable with %d canaries)",
        point.name,
        run.audit.epsilon_lower_bound,
        100 * audit.confidence,
        run.epsilon_accounted,
        run.max_certifiable_epsilon,
        audit.canaries,
    )
    return written


def run_sweep(settings: SweepSettings, out: Path) -> list[dict[str, Any]]:
    """Every point of the sweep, then the report (markdown, JSON, PNG) in ``out``."""
    from fedmm.simulations.privacy.sweep_report import write_sweep_report

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.monotonic()
    points = settings.points()
    # The overfit point first: it shows whether the attacks work at all, and it is cheap.
    # The report is rewritten after every point, in table order, so a partial sweep has one.
    done: dict[str, dict[str, Any]] = {}
    # overfit first, audits last (white-box after black-box)
    order = sorted(points, key=lambda p: (not p.overfit, p.audit or p.gradient_audit))
    for index, point in enumerate(order, start=1):
        logger.info("point %d/%d: %s", index, len(points), point.name)
        done[point.name] = run_point(point, settings, out)
        results = [done[p.name] for p in points if p.name in done]
        write_sweep_report(results, settings=_jsonable(asdict(settings)), out=out)
        logger.info(
            "point %d/%d done, %.0f s since the start",
            index,
            len(points),
            time.monotonic() - started,
        )
    return [done[p.name] for p in points]
