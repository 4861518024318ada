"""White-box one-run audit of a site's DP-SGD step with gradient (Dirac) canaries.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846), Sec. 7, their white-box DP-SGD experiments: the canaries are gradients,
not records, and the auditor sees every iterate. Here:

- **Canaries**: ``m`` Dirac canaries, canary ``i`` a gradient equal to the clip norm ``C`` on
  one coordinate of the model's trainable parameters and zero elsewhere; the ``m``
  coordinates are distinct, drawn uniformly from all trainable coordinates (by a seed fixed
  before the run, independent of inclusion). Canary ``i`` is included with probability 1/2
  by a keyed bit (``canaries.inclusion_bits``: HMAC-SHA256 under a 32-byte key from
  ``os.urandom``, ``canaries.load_or_create_key``).
- **The run**: one DP-SGD run of the site's own code (``client.secure_dp_sgd.train_dp_sgd``)
  on real benchmark records (site 0's capped partition, the sweep's split) with the real
  model and the run's optimizer: its Poisson batches from the CSPRNG, per-example
  clipping, the CSPRNG's Gaussian noise with sigma from ``calibrate_noise_multiplier`` for
  (epsilon, delta, q, steps) and Opacus' RDP accountant. An included canary joins each
  step's batch independently with the records' rate q; its gradient goes through the same
  clipping (``clip_factors``) and into the same clipped sum before the noise, by the step's
  audit-only argument (``secure_dp_sgd.StepAudit``). Epsilon inf is sigma 0: clipping but no
  noise.
- **The auditor** (white box, every iterate): observes every step's released gradient,
  ``(clipped sum + noise) / expected batch``, and scores canary ``i`` by the sum over the
  steps of that gradient's coordinate ``i`` times the expected batch (the noisy clipped
  sums' coordinate). An included canary adds ``C`` at every step it is sampled in.
- **The bound**: ``one_run_audit.audit_from_scores``, as the black-box audit (``audit_run``):
  "in" for the ``k`` highest scores, "out" for the ``k`` lowest, a fixed list of ``k``, each
  tested at the Bonferroni-corrected level, at the stated confidence and delta.

What this audits: the site's DP-SGD step (sampling, clipping, noise, its CSPRNG) and the
accountant's epsilon for that many steps at that rate. What it does not: the federation
(secure aggregation, FedAvg, the rounds' model exchange: the run here is one site's steps in
sequence, on one model), the noisy record count, de-identification, and the model code
outside the clipped sum (a per-example gradient computed wrongly would go unnoticed: the
canaries bypass the model).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedmm.client.privacy_ledger import calibrate_noise_multiplier, epsilon_of
from fedmm.client.secure_dp_sgd import StepAudit, train_dp_sgd
from fedmm.client.training import (
    MatchingDataset,
    TrainingRecipe,
    make_optimizer,
    sample_rate,
    steps_per_epoch,
)
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.secure_random import RandomBytes, bernoulli_indices, fresh_random_bytes
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.simulations.privacy.canaries import inclusion_bits
from fedmm.simulations.privacy.one_run_audit import (
    OneRunAudit,
    audit_from_scores,
    default_guess_counts,
    epsilon_lower_bound,
)

#: What the white-box audit scores, as recorded with each point.
SCORE = "sum over steps of the noisy clipped sum at the canary's coordinate"


@dataclass(frozen=True)
class DiracCanaries:
    """``m`` gradient canaries: canary ``i`` is ``C`` at flat position ``positions[i]`` of
    parameter ``names[i]``, included when ``included[i]``."""

    names: list[str]
    positions: np.ndarray
    included: np.ndarray


def place_canaries(
    model: torch.nn.Module, *, count: int, key: bytes, seed: int = 0
) -> DiracCanaries:
    """``count`` distinct coordinates drawn uniformly (with ``seed``) from the model's
    trainable parameters, and their keyed inclusion bits."""
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    total = sum(size for _, size in trainable)
    if not 2 <= count <= total:
        raise ValueError(
            f"the audit needs between 2 and {total} canaries (trainable coordinates), got "
            f"{count}: lower --gradient-audit-canaries"
        )
    flat = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    starts = np.cumsum([0] + [size for _, size in trainable])
    owner = np.searchsorted(starts, flat, side="right") - 1
    return DiracCanaries(
        names=[trainable[o][0] for o in owner],
        positions=flat - starts[owner],
        included=inclusion_bits(key, count),
    )


class _CanaryTap:
    """The audit's side of the steps: the sampled included canaries as per-example
    gradients, and each canary's running score from the released gradients."""

    def __init__(
        self,
        canaries: DiracCanaries,
        parameters: dict[str, torch.nn.Parameter],
        *,
        norm: float,
        rate: float,
        expected_batch: float,
        random_bytes: RandomBytes,
    ) -> None:
        self.canaries = canaries
        self.shapes = {name: p.shape for name, p in parameters.items()}
        self.norm, self.rate, self.expected_batch = norm, rate, expected_batch
        self.random_bytes = random_bytes
        self.scores = np.zeros(len(canaries.names), dtype=np.float64)
        self.appearances = np.zeros(len(canaries.names), dtype=np.int64)
        by_name: dict[str, list[int]] = {}
        for index, name in enumerate(canaries.names):
            by_name.setdefault(name, []).append(index)
        self.by_name = {n: np.asarray(ids) for n, ids in by_name.items()}

    def extra_gradients(self, step: int) -> dict[str, torch.Tensor]:
        """This step's included canaries, each sampled with the records' rate q."""
        sampled = bernoulli_indices(len(self.canaries.names), self.rate, self.random_bytes)
        sampled = sampled[self.canaries.included[sampled]]
        self.appearances[sampled] += 1
        if sampled.size == 0:
            return {}
        gradients: dict[str, torch.Tensor] = {}
        for row, index in enumerate(sampled):
            name = self.canaries.names[index]
            if name not in gradients:
                gradients[name] = torch.zeros((len(sampled), *self.shapes[name]))
            gradients[name][row].view(-1)[int(self.canaries.positions[index])] = self.norm
        return gradients

    def observe(self, step: int, released: dict[str, torch.Tensor]) -> None:
        for name, ids in self.by_name.items():
            values = released[name].detach().reshape(-1)[self.canaries.positions[ids]]
            self.scores[ids] += values.double().numpy() * self.expected_batch


@dataclass(frozen=True)
class GradientAuditRun:
    """One white-box audited DP-SGD run: the mechanism's settings and the audit."""

    epsilon_target: float
    epsilon_accounted: float  # Opacus RDP of the run's accountant history (inf: no noise)
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    records: int
    max_grad_norm: float
    audit: OneRunAudit
    max_certifiable_epsilon: float  # the bound with every guess right that can be
    mean_score_in: float
    mean_score_out: float
    mean_appearances_in: float
    scores: list[float]
    included: list[bool]
    wall_s: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def max_certifiable_epsilon(
    *, canaries: int, included: int, delta: float, confidence: float
) -> float:
    """The largest bound any attack could give on ``canaries`` canaries of which
    ``included`` are in: every guess right where it can be (``k`` "in" guesses are all
    right only if ``k <= included``), at the default guess counts and Bonferroni level of
    ``audit_from_scores``."""
    if not 0 <= included <= canaries:
        raise ValueError(f"included canaries must be in [0, {canaries}], got {included}")
    pairs = default_guess_counts(canaries)
    level = (1 - confidence) / len(pairs)
    return max(
        epsilon_lower_bound(
            m=canaries,
            r=k_in + k_out,
            v=min(k_in, included) + min(k_out, canaries - included),
            delta=delta,
            significance=level,
        )
        for k_in, k_out in pairs
    )


def run_gradient_canary_audit(
    records: ImageTextDataset,
    *,
    model_config: ModelConfig,
    recipe: TrainingRecipe,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    steps: int,
    canaries: int,
    key: bytes,
    confidence: float = 0.95,
    random_bytes: RandomBytes | None = None,
    model_seed: int = 0,
    canary_norm: float | None = None,
) -> GradientAuditRun:
    """One DP-SGD run of ``steps`` steps on ``records`` (Poisson rate q = 1 / ceil(records /
    batch), sigma calibrated for ``epsilon``; inf: sigma 0) with ``canaries`` Dirac canaries
    included by ``key``, scored white-box and audited (module docstring).
    ``random_bytes``: the CSPRNG stream of the batches, canary sampling and noise (default
    fresh from ``os.urandom``; a fixed key makes tests reproducible). ``canary_norm``: the
    canaries' norm before clipping (default the clip norm; larger ones test the clipping)."""
    if len(records) < 1 or steps < 1:
        raise ValueError(f"the audit needs records and steps, got {len(records)} and {steps}")
    started = time.monotonic()
    stream = random_bytes or fresh_random_bytes()
    rate = sample_rate(len(records), recipe.batch_size)
    expected = rate * len(records)
    sigma = calibrate_noise_multiplier(epsilon=epsilon, delta=delta, sample_rate=rate, steps=steps)
    torch.manual_seed(model_seed)
    model = CrossAttentionMatcher(model_config)
    placed = place_canaries(model, count=canaries, key=key, seed=model_seed)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tap = _CanaryTap(
        placed,
        parameters,
        norm=max_grad_norm if canary_norm is None else canary_norm,
        rate=rate,
        expected_batch=expected,
        random_bytes=stream,
    )
    dataset = MatchingDataset(
        records,
        tokenizer=HashingTokenizer.for_model(model_config),
        num_distractors=recipe.num_distractors,
        seed=int.from_bytes(stream(8), "little"),
        distractors=recipe.distractors,
    )
    _, history = train_dp_sgd(
        model,
        dataset,
        optimizer=make_optimizer(model, recipe),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        sample_rate=rate,
        steps=steps,
        expected_batch_size=expected,
        accountant_history=[],
        random_bytes=stream,
        audit=StepAudit(extra_gradients=tap.extra_gradients, observe=tap.observe),
    )
    audit = audit_from_scores(tap.scores, placed.included, delta=delta, confidence=confidence)
    inside, outside = tap.scores[placed.included], tap.scores[~placed.included]
    return GradientAuditRun(
        epsilon_target=epsilon,
        epsilon_accounted=epsilon_of(history, delta) if sigma > 0 else math.inf,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=rate,
        steps=steps,
        records=len(records),
        max_grad_norm=max_grad_norm,
        audit=audit,
        max_certifiable_epsilon=max_certifiable_epsilon(
            canaries=canaries, included=audit.included, delta=delta, confidence=confidence
        ),
        mean_score_in=float(inside.mean()) if inside.size else math.nan,
        mean_score_out=float(outside.mean()) if outside.size else math.nan,
        mean_appearances_in=float(tap.appearances[placed.included].mean()) if inside.size else 0.0,
        scores=[float(s) for s in tap.scores],
        included=[bool(b) for b in placed.included],
        wall_s=round(time.monotonic() - started, 1),
    )


def site_steps(*, records: int, batch_size: int, local_epochs: int, rounds: int) -> int:
    """The steps a site takes over a run (``client.training``: epochs of ceil(n / batch))."""
    return rounds * local_epochs * steps_per_epoch(records, batch_size)


def audit_site_recipe(
    run_config: dict[str, str],
    *,
    epsilon: float,
    sites: int,
    rounds: int,
    records_per_site: int,
    canaries: int,
    confidence: float,
    key: bytes,
) -> GradientAuditRun:
    """The white-box audit of site 0 of the run ``run_config`` describes (its model,
    optimizer, batch size, local epochs, clip norm and delta; ``sites`` sites, ``rounds``
    rounds): ``run_gradient_canary_audit`` on site 0's capped partition (the sweep's split,
    ``membership_split``), for all the steps the site takes over the run, with one model
    from the first to the last step (the federation's averaging between rounds left out)."""
    from fedmm.common.data.benchmark import benchmark_train_records
    from fedmm.common.data.partitioning import partition_indices
    from fedmm.common.federation_config import FederationConfig
    from fedmm.common.train_request import model_config_of

    config = FederationConfig.from_run_config(run_config)
    records = benchmark_train_records(config.data_dir or None)
    own = partition_indices(
        records.labels,
        num_partitions=sites,
        partition_id=0,
        scheme=config.partition,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
    )[:records_per_site]
    return run_gradient_canary_audit(
        records.subset(own),
        model_config=model_config_of(config),
        recipe=TrainingRecipe.from_settings(config, seed=config.seed),
        epsilon=epsilon,
        delta=config.delta,
        max_grad_norm=config.max_grad_norm,
        steps=site_steps(
            records=len(own),
            batch_size=config.batch_size,
            local_epochs=config.local_epochs,
            rounds=rounds,
        ),
        canaries=canaries,
        key=key,
        confidence=confidence,
    )
