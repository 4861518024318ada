"""One audited federated run: canaries inserted at the sites, one training run, the one-run
audit's empirical epsilon (Steinke, Nasr and Jagielski, NeurIPS 2023; ``one_run_audit``).

Before the run, ``canaries`` draws the canaries and writes every site's imagefolder (its
capped benchmark partition and its included canaries). ``fedmm simulate --site-data`` then
trains on them, with the benchmark's geometry and tokenizer set explicitly (a --site-data
run otherwise starts from the real-data defaults). After it, the final global model scores
every canary with the loss-threshold attack (Yeom et al., CSF 2018; the same queries as the
membership sweep, ``membership_scores``): minus the canary's mean loss over its queries, so a
memorised wrong caption scores high. The attacker here sees the released model only (black
box, one run, no shadow models).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmm.common.federation_config import FederationConfig

logger = logging.getLogger(__name__)

#: The benchmark's geometry and tokenizer, set on the audited runs: they read imagefolders,
#: whose runs otherwise default to the real-data settings (``simulations.cli``).
BENCHMARK_GEOMETRY_KEYS = (
    "image-size",
    "image-channels",
    "model-patch-size",
    "model-vocab-buckets",
    "model-caption-words",
    "distractor-word-lists",
)


@dataclass(frozen=True)
class AuditSettings:
    """The one-run audit points of the sweep."""

    canaries: int = 1000
    epsilons: tuple[float, ...] = (math.inf, 8.0, 3.0, 1.0)
    confidence: float = 0.95
    partition: str = "iid"
    run_config: dict[str, str] = field(default_factory=dict)  # --set-audit pairs

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"the audit needs at least 2 canaries, got {self.canaries}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"audit confidence must be in (0, 1), got {self.confidence}")
        bad = [e for e in self.epsilons if not (e > 0 or math.isinf(e))]
        if bad or not self.epsilons:
            raise ValueError(f"audit epsilons must be > 0 or inf, got {bad or self.epsilons}")


def audited_run_config(run_config: dict[str, str]) -> dict[str, str]:
    """``run_config`` with the benchmark's geometry and tokenizer where it sets none."""
    defaults = FederationConfig().to_run_config()
    return {**{k: str(defaults[k]) for k in BENCHMARK_GEOMETRY_KEYS}, **run_config}


def prepare_canary_sites(
    point_dir: Path,
    *,
    run_config: dict[str, str],
    num_sites: int,
    partition: str,
    records_per_site: int,
    canaries: int,
) -> list[Path]:
    """Draw the canaries (key in ``point_dir``) and write the sites' imagefolders."""
    from fedmm.common.data.benchmark import benchmark_train_records
    from fedmm.simulations.privacy.canaries import (
        KEY_FILE,
        draw_canaries,
        load_or_create_key,
        write_site_folders,
    )

    config = FederationConfig.from_run_config({**run_config, "partition": partition})
    records = benchmark_train_records(config.data_dir or None)
    split = {
        "num_sites": num_sites,
        "scheme": config.partition,
        "alpha": config.dirichlet_alpha,
        "partition_seed": config.seed,
        "records_per_site": records_per_site,
    }
    canary_set = draw_canaries(
        records, count=canaries, key=load_or_create_key(point_dir / KEY_FILE), **split
    )
    return write_site_folders(point_dir, records, canary_set, **split)


@dataclass(frozen=True)
class CanaryScores:
    scores: list[float]
    included: list[bool]
    sites: list[int]


def score_canaries(run_dir: Path, point_dir: Path, *, queries: int, seed: int) -> CanaryScores:
    """Minus each canary's mean loss under the run's final global model."""
    import json

    import numpy as np

    from fedmm.common.data.benchmark import benchmark_train_records
    from fedmm.common.data.dataset import ImageTextDataset
    from fedmm.common.tokenizer import HashingTokenizer
    from fedmm.simulations.privacy.canaries import CANARIES_FILE
    from fedmm.simulations.privacy.membership_experiment import (
        load_global_model,
        read_run_config,
    )
    from fedmm.simulations.privacy.membership_inference import loss_threshold_scores
    from fedmm.simulations.privacy.membership_scores import build_queries, membership_signals

    config = read_run_config(run_dir)
    saved = json.loads((point_dir / CANARIES_FILE).read_text())
    records = benchmark_train_records(config.data_dir or None)
    raw = records.subset(np.asarray(saved["source_indices"], dtype=np.int64))
    canaries = ImageTextDataset(images=raw.images, captions=saved["captions"], labels=raw.labels)
    model = load_global_model(run_dir)
    tokenizer = HashingTokenizer(
        max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
    )
    signals = membership_signals(
        model,
        build_queries(
            canaries,
            tokenizer=tokenizer,
            num_distractors=config.num_distractors,
            num_queries=queries,
            seed=seed,
        ),
    )
    return CanaryScores(
        scores=loss_threshold_scores(signals.loss).tolist(),
        included=[bool(b) for b in saved["included"]],
        sites=[int(s) for s in saved["sites"]],
    )


def audit_result(scores: CanaryScores, *, delta: float, confidence: float) -> dict[str, Any]:
    """The audit of ``scores`` as JSON-ready values."""
    import numpy as np

    from fedmm.simulations.privacy.one_run_audit import audit_from_scores

    audit = audit_from_scores(
        np.asarray(scores.scores),
        np.asarray(scores.included),
        delta=delta,
        confidence=confidence,
    )
    in_scores = [s for s, i in zip(scores.scores, scores.included, strict=True) if i]
    out_scores = [s for s, i in zip(scores.scores, scores.included, strict=True) if not i]
    return {
        "epsilon_lower_bound": audit.epsilon_lower_bound,
        "confidence": audit.confidence,
        "delta": audit.delta,
        "canaries": audit.canaries,
        "included": audit.included,
        "best": asdict(audit.best),
        "guesses": [asdict(g) for g in audit.guesses],
        "mean_loss_in": -float(np.mean(in_scores)) if in_scores else None,
        "mean_loss_out": -float(np.mean(out_scores)) if out_scores else None,
    }
