"""One audited federated run: canaries inserted at the sites, one training run, the one-run
audit's empirical epsilon (Steinke, Nasr and Jagielski, NeurIPS 2023; ``one_run_audit``).

Before the run, ``canaries`` draws the canaries and writes every site's imagefolder (its
capped benchmark partition and its included canaries). ``fedmm simulate --site-data`` then
trains on them, with the benchmark's geometry and tokenizer set explicitly (a --site-data
run otherwise starts from the real-data defaults). After it, the attacker queries the final
global model with each canary's image and two captions, its wrong one and its true class's
evaluation caption, and scores the canary by the margin between the two scores (a
per-canary calibrated loss-threshold attack, Yeom et al., CSF 2018; Steinke et al. score
with the loss): an OUT canary's image is seen as its true class, an IN canary whose wrong
caption was memorised scores higher. Measured on the main sweep's non-private recipe with
the plain loss the audit had no power (bound 0): subtracting the true class's score removes
most of the canary-to-canary variance. The attacker sees the released model only (black
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


@dataclass(frozen=True)
class GradientAuditSettings:
    """The sweep's white-box audit points: ``canaries`` Dirac canaries at each epsilon
    (``None``: the black-box audit's epsilons, else the sweep's):
    ``gradient_canary_audit``."""

    canaries: int = 1000
    epsilons: tuple[float, ...] | None = None
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(
                f"the white-box audit needs at least 2 canaries, got {self.canaries}: "
                "raise --gradient-audit-canaries or pass --no-gradient-audit"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"audit confidence must be in (0, 1), got {self.confidence}")


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


def canary_margins(model: Any, images: Any, captions: list[str], labels: Any) -> Any:
    """Per canary: the model's score of its (wrong) caption minus its score of its true
    class's evaluation caption, both as the model scores captions (``common.loss``)."""
    import numpy as np
    import torch

    from fedmm.common.data.captions import canonical_caption
    from fedmm.common.tokenizer import HashingTokenizer

    tokenizer = HashingTokenizer(
        max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
    )
    true_captions = [canonical_caption(int(label)) for label in labels]
    tokens = np.stack(
        [tokenizer.encode_batch([c, t]) for c, t in zip(captions, true_captions, strict=True)]
    )  # (N, 2, T): the canary's caption, then the true class's
    model.eval()
    margins = []
    with torch.no_grad():
        for start in range(0, len(captions), 500):
            scores = model(
                torch.from_numpy(images[start : start + 500]),
                torch.from_numpy(tokens[start : start + 500]),
            ).double()
            margins.append(scores[:, 0] - scores[:, 1])
    return torch.cat(margins).numpy()


def score_canaries(run_dir: Path, point_dir: Path) -> CanaryScores:
    """Each canary's margin (:func:`canary_margins`) under the run's final global model:
    high when the model has learnt the canary's wrong caption for that very image."""
    import json

    import numpy as np

    from fedmm.common.data.benchmark import benchmark_train_records
    from fedmm.simulations.privacy.canaries import CANARIES_FILE
    from fedmm.simulations.privacy.membership_experiment import (
        load_global_model,
        read_run_config,
    )

    config = read_run_config(run_dir)
    saved = json.loads((point_dir / CANARIES_FILE).read_text())
    records = benchmark_train_records(config.data_dir or None)
    raw = records.subset(np.asarray(saved["source_indices"], dtype=np.int64))
    margins = canary_margins(load_global_model(run_dir), raw.images, saved["captions"], raw.labels)
    return CanaryScores(
        scores=[float(m) for m in margins],
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
        "mean_margin_in": float(np.mean(in_scores)) if in_scores else None,
        "mean_margin_out": float(np.mean(out_scores)) if out_scores else None,
    }
