"""Membership inference against the final global model of one federated run.

Members are one site's training records, non-members records of the same partition that
no site trained on (``membership_split``); both are taken as that site holds them, i.e.
de-identified under the site's own policy and secret, exactly as the site trained on them.
The shadow pool is de-identified the same way, so the shadow models see the same
distribution. Two attacks are run (``membership_inference``): the global loss threshold
and offline LiRA (Carlini et al., "Membership Inference Attacks From First Principles",
IEEE S&P 2022) with ``shadows`` shadow federations trained by ``shadow_training``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedmm.common.data.benchmark import benchmark_test_set, benchmark_train_records
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.simulations.privacy.attack_metrics import AttackSummary, RocCurve, roc_curve
from fedmm.simulations.privacy.membership_inference import (
    loss_threshold_scores,
    offline_lira_scores,
)
from fedmm.simulations.privacy.membership_scores import (
    RecordQueries,
    build_queries,
    membership_signals,
)
from fedmm.simulations.privacy.membership_split import membership_split, shadow_site_indices
from fedmm.simulations.privacy.shadow_training import FederatedRecipe, train_shadow_federation

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run-config.json"
#: Attack names as they appear in reports.
LOSS_ATTACK = "loss threshold"
LIRA_ATTACK = "offline LiRA"
LIRA_GLOBAL_ATTACK = "offline LiRA (global variance)"
#: Held-out items a shadow model's caption-ranking accuracy is measured on.
SHADOW_EVAL_SINGLES = 2000
SHADOW_EVAL_SCENES = 100


@dataclass(frozen=True)
class AttackSettings:
    """How the attacker works; the recipe it imitates comes from the run itself."""

    num_sites: int
    shadows: int = 4
    queries: int = 2
    target_site: int = 0
    max_targets: int | None = None
    workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shadows < 2:
            raise ValueError(f"offline LiRA needs at least 2 shadow models, got {self.shadows}")
        if self.queries < 1 or self.workers < 1 or self.num_sites < 1:
            raise ValueError("queries, workers and num_sites must be at least 1")


@dataclass
class MembershipResult:
    """What the attacks achieved on one run, with the data they were measured on."""

    target_site: int
    num_members: int
    num_non_members: int
    shadow_pool: int
    trained_records: int
    summaries: list[AttackSummary]
    curves: dict[str, RocCurve] = field(repr=False)
    shadow_accuracy: list[float]
    wall_s: float


@dataclass(frozen=True)
class _ShadowJob:
    sites: list[ImageTextDataset]
    recipe: FederatedRecipe
    queries: RecordQueries
    seed: int
    data_dir: str | None
    eval_single_items: int
    eval_scenes: int


def _train_and_score_shadow(job: _ShadowJob) -> tuple[np.ndarray, float]:
    """One shadow federation: its scaled confidences on the targets and its accuracy."""
    from fedmm.server.evaluation import evaluate

    torch.set_num_threads(1)
    # Opacus' noise calibration probes sigma = 20 first, whose optimum is its largest order;
    # the secure-RNG notice is the project's documented choice (secure_mode=False).
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    model = train_shadow_federation(job.sites, job.recipe, seed=job.seed)
    signals = membership_signals(model, job.queries)
    test = benchmark_test_set(job.data_dir, num_scenes=job.eval_scenes)
    tokenizer = HashingTokenizer(
        max_len=job.recipe.model.max_len, num_buckets=job.recipe.model.vocab_buckets
    )
    accuracy = evaluate(model, test.first_singles(job.eval_single_items), tokenizer).accuracy
    return signals.scaled_confidence, accuracy


def load_global_model(run_dir: Path) -> CrossAttentionMatcher:
    """The run's final global model (``model.safetensors`` + ``model-config.json``)."""
    config = ModelConfig(**json.loads((run_dir / "model-config.json").read_text()))
    model = CrossAttentionMatcher(config)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model


def read_run_config(run_dir: Path) -> FederationConfig:
    """The run's config (``run-config.json``), for a run whose sites ran local DP-SGD."""
    saved = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
    if saved.get("dp-mode", "local") != "local":
        raise ValueError(
            f"{run_dir} used dp-mode {saved['dp-mode']!r}: the shadow models replay local "
            "DP-SGD at each site only (dp-mode = local)"
        )
    known = set(FederationConfig().to_run_config())
    ignored = sorted(set(saved) - known)
    if ignored:
        logger.warning("%s: run config keys unknown here are ignored: %s", run_dir, ignored)
    return FederationConfig.from_run_config({k: v for k, v in saved.items() if k in known})


def _site_view(
    run_dir: Path, target_site: int, cache_dir: Path
) -> Callable[[ImageTextDataset, str], ImageTextDataset]:
    """The target site's de-identification of records, as a function of raw records."""
    from fedmm.client.site_data import SiteDeidSettings, deidentified_records

    policy = run_dir / "site-deid-policy.toml"
    secret = run_dir / "site-deid" / f"site-{target_site}" / "site-secret"
    if not policy.exists():
        logger.warning("%s has no de-identification policy: records are used as they are", run_dir)
        return lambda raw, name: raw
    if not secret.exists():
        raise FileNotFoundError(
            f"{secret} not found: site {target_site} of this run never de-identified its data "
            "(did it train?)"
        )
    settings = SiteDeidSettings(policy_file=policy, secret_file=secret, cache_dir=cache_dir)
    return lambda raw, name: deidentified_records(
        raw, source=("privacy-eval", name), settings=settings
    )


def run_membership_experiment(run_dir: Path, settings: AttackSettings) -> MembershipResult:
    """Both attacks against the final model in ``run_dir`` (a finished ``fedmm simulate``)."""
    started = time.monotonic()
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    records = benchmark_train_records(config.data_dir or None)
    split = membership_split(
        records.labels,
        num_sites=settings.num_sites,
        scheme=config.partition,  # type: ignore[arg-type]
        alpha=config.dirichlet_alpha,
        partition_seed=config.seed,
        records_per_site=config.site_records_limit,
        target_site=settings.target_site,
        max_targets=settings.max_targets,
        seed=settings.seed,
    )
    site_view = _site_view(run_dir, settings.target_site, run_dir / "privacy-eval" / "deid")
    targets = site_view(records.subset(split.targets), "targets")
    logger.info(
        "%s: %d members and %d non-members of site %d, shadow pool %d records",
        run_dir.name,
        len(split.members),
        len(split.non_members),
        split.target_site,
        len(split.shadow_pool),
    )
    model = load_global_model(run_dir)
    tokenizer = HashingTokenizer(
        max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
    )
    queries = build_queries(
        targets,
        tokenizer=tokenizer,
        num_distractors=config.num_distractors,
        num_queries=settings.queries,
        seed=settings.seed,
    )
    target = membership_signals(model, queries)
    recipe = FederatedRecipe.of(config)
    shadow_seeds = [1_000_003 * (settings.seed + 1) + j for j in range(settings.shadows)]
    shadow_sites = [  # never the run's own split seed
        shadow_site_indices(
            split,
            records.labels,
            num_sites=settings.num_sites,
            scheme=config.partition,  # type: ignore[arg-type]
            alpha=config.dirichlet_alpha,
            records_per_site=config.site_records_limit,
            shadow_seed=seed,
        )
        for seed in shadow_seeds
    ]
    used = np.unique(np.concatenate([idx for sites in shadow_sites for idx in sites]))
    public = site_view(records.subset(used), "shadow-data")  # only what shadows train on
    jobs = []
    for shadow_seed, site_indices in zip(shadow_seeds, shadow_sites, strict=True):
        sites = [public.subset(np.searchsorted(used, idx)) for idx in site_indices]
        jobs.append(
            _ShadowJob(
                sites=sites,
                recipe=recipe,
                queries=queries,
                seed=shadow_seed,
                data_dir=config.data_dir or None,
                # a sanity check that the shadows learn like the target, not a result
                eval_single_items=min(config.eval_single_items, SHADOW_EVAL_SINGLES),
                eval_scenes=min(config.eval_scenes, SHADOW_EVAL_SCENES),
            )
        )
    shadow_confidences, shadow_accuracy = _run_shadow_jobs(jobs, settings.workers, run_dir.name)
    is_member = split.is_member
    scores = {
        LOSS_ATTACK: loss_threshold_scores(target.loss),
        LIRA_ATTACK: offline_lira_scores(target.scaled_confidence, shadow_confidences),
        LIRA_GLOBAL_ATTACK: offline_lira_scores(
            target.scaled_confidence, shadow_confidences, variance="global"
        ),
    }
    curves = {name: roc_curve(value, is_member) for name, value in scores.items()}
    summaries = [AttackSummary.of(name, curve) for name, curve in curves.items()]
    for summary in summaries:
        logger.info(
            "%s: %s AUC %.3f, TPR %.4f at 0.1%% FPR, %.4f at 1%% FPR",
            run_dir.name,
            summary.attack,
            summary.auc,
            summary.tpr_at_0_1_fpr,
            summary.tpr_at_1_fpr,
        )
    return MembershipResult(
        target_site=split.target_site,
        num_members=len(split.members),
        num_non_members=len(split.non_members),
        shadow_pool=len(split.shadow_pool),
        trained_records=split.trained_records,
        summaries=summaries,
        curves=curves,
        shadow_accuracy=shadow_accuracy,
        wall_s=time.monotonic() - started,
    )


def _run_shadow_jobs(
    jobs: list[_ShadowJob], workers: int, name: str
) -> tuple[np.ndarray, list[float]]:
    """Train and score the shadow federations, ``workers`` at a time (child processes)."""
    results: list[tuple[np.ndarray, float]] = []
    if workers == 1:
        for index, job in enumerate(jobs, start=1):
            results.append(_train_and_score_shadow(job))
            logger.info("%s: shadow model %d/%d trained", name, index, len(jobs))
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch state in the workers
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            for index, result in enumerate(pool.map(_train_and_score_shadow, jobs), start=1):
                results.append(result)
                logger.info("%s: shadow model %d/%d trained", name, index, len(jobs))
    return np.stack([r[0] for r in results]), [float(r[1]) for r in results]
