"""Membership inference attacks on the trained model: a global loss threshold and offline LiRA.

Both turn a model's answers about a record (``membership_scores``) into one score per
record, higher meaning "more likely a training member"; ``attack_metrics`` turns scores and
the true membership into an ROC curve.

- Loss threshold (Yeom et al., "Privacy Risk in Machine Learning", IEEE CSF 2018): a
  record whose loss is below one global threshold is called a member. Score: minus the
  loss (mean over the record's queries).
- Offline LiRA (Carlini et al., "Membership Inference Attacks From First Principles",
  IEEE S&P 2022, Sec. IV-C and Algorithm 1 without IN models): shadow models are trained
  with the same recipe on data that excludes every target record, so each of them is an
  OUT model for every target. For each target record (and query) a Gaussian
  ``N(mu_out, sigma_out^2)`` is fitted to the shadow models' scaled confidences, and the
  one-sided test asks how far above the OUT distribution the target model's confidence
  lies: ``Lambda = Pr[Z < phi_target] = Phi((phi_target - mu_out) / sigma_out)``. Several
  queries are combined by the mean of their z-scores (Stouffer), a monotone stand-in for
  LiRA's product of per-augmentation likelihoods; with one query the ranking is exactly
  the p-value's. ``variance="global"`` uses one sigma per query over all records, which
  Carlini et al. recommend when there are few shadow models (fewer than about 64).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

VarianceMode = Literal["per-example", "global"]
#: Lower bound on a fitted standard deviation, in units of the scaled confidence (logits):
#: shadow models that agree exactly must not give an infinite z-score.
MIN_STD = 1e-4


def loss_threshold_scores(loss: np.ndarray) -> np.ndarray:
    """Membership scores ``(N,)`` of the global loss-threshold attack, from losses ``(N, Q)``."""
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim != 2:
        raise ValueError(f"loss must be (records, queries), got shape {loss.shape}")
    return -loss.mean(axis=1)


def offline_lira_scores(
    target_confidence: np.ndarray,
    shadow_confidences: np.ndarray,
    *,
    variance: VarianceMode = "per-example",
) -> np.ndarray:
    """Offline LiRA scores ``(N,)``: the mean z-score of the target model's scaled confidence
    ``(N, Q)`` against Gaussians fitted to the OUT shadow models' ``(S, N, Q)``."""
    target = np.asarray(target_confidence, dtype=np.float64)
    shadows = np.asarray(shadow_confidences, dtype=np.float64)
    if target.ndim != 2 or shadows.ndim != 3 or shadows.shape[1:] != target.shape:
        raise ValueError(
            "target_confidence must be (records, queries) and shadow_confidences "
            f"(shadows, records, queries) of the same records; got {target.shape} and "
            f"{shadows.shape}"
        )
    if shadows.shape[0] < 2:
        raise ValueError(
            f"offline LiRA fits a Gaussian per record: it needs at least 2 shadow models, got "
            f"{shadows.shape[0]}"
        )
    if variance not in ("per-example", "global"):
        raise ValueError(f"variance must be 'per-example' or 'global', got {variance!r}")
    if not (np.isfinite(target).all() and np.isfinite(shadows).all()):
        raise ValueError("scaled confidences must be finite")
    mean_out = shadows.mean(axis=0)
    if variance == "per-example":
        std_out = shadows.std(axis=0, ddof=1)
    else:
        std_out = np.broadcast_to((shadows - mean_out).std(axis=(0, 1), ddof=1), mean_out.shape)
    z = (target - mean_out) / np.maximum(std_out, MIN_STD)
    return z.mean(axis=1)
