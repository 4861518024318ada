"""Empirical epsilon lower bound from one training run (a one-run privacy audit).

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). ``m`` canaries are each included in the training data independently
with probability 1/2 (``S_i`` in {-1, +1}, uniform and independent); the model is trained
once; an attack scores every canary; the auditor guesses "in" for the ``k+`` highest scores,
"out" for the ``k-`` lowest and abstains on the rest (``r = k+ + k-`` guesses). If training
is (epsilon, delta)-DP with respect to each canary, the number ``v`` of correct guesses is
stochastically dominated as in the paper's Theorem 5.2 (Theorem 3.1 when delta = 0):

    P[W >= v] <= beta + 2 m delta alpha,
    beta  = P[Binomial(r, q) >= v],            q = e^eps / (1 + e^eps),
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i,

which is the p-value the paper's reference code computes (its Algorithm 2 and the
accompanying Python, ``p_value_DP_audit``): the same formula here, evaluated with
``scipy.stats.binom``. The empirical epsilon at confidence ``1 - significance`` is the
largest epsilon whose p-value is below ``significance`` (the p-value decreases as epsilon
falls), found by bisection: with probability at least ``1 - significance`` over the
canaries' inclusion and the training randomness, the true epsilon is at least the bound.

Choosing ``k+`` and ``k-`` after seeing the scores would void that confidence; this module
takes a fixed, stated list of ``(k+, k-)`` pairs and applies a Bonferroni correction over
them (each pair is tested at ``significance / len(pairs)``), so the maximum over the list
is a valid bound at the stated confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Bisection steps for the epsilon bound (the interval halves each step).
_BISECTION_STEPS = 50
#: Largest epsilon searched: the bound is reported as at most this.
MAX_EPSILON = 100.0


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct guesses ({v}) <= guesses ({r}) <= canaries ({m})")


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` or more correct guesses out of ``r`` on ``m`` canaries under the
    null hypothesis that training is (``epsilon``, ``delta``)-DP (Steinke et al., Thm 5.2)."""
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    # P[v - i <= Binomial(r, q) < v] for i = 1..v, divided by i; alpha is its maximum
    i = np.arange(1, v + 1)
    window = np.cumsum(stats.binom.pmf(v - i, r, q))
    alpha = float(np.max(window / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon that ``v`` correct guesses of ``r`` on ``m`` canaries refute at
    level ``significance`` (0 when none is refuted, ``MAX_EPSILON`` at most)."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    _check_counts(m, r, v)

    def refuted(epsilon: float) -> bool:
        return one_run_p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) < significance

    if not refuted(0.0):
        return 0.0
    if refuted(MAX_EPSILON):
        return MAX_EPSILON
    low, high = 0.0, MAX_EPSILON  # refuted(low), not refuted(high)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if refuted(middle):
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditGuess:
    """One ``(k+, k-)`` choice: how many guesses it made and how many were right."""

    k_in: int
    k_out: int
    guesses: int
    correct: int
    epsilon: float  # its bound at the Bonferroni-corrected level


@dataclass(frozen=True)
class OneRunAudit:
    """The audit's result: the bound at ``confidence`` and what it was computed from."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    best: AuditGuess
    guesses: list[AuditGuess]


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """``(k+, k-)`` pairs tried by default: equal numbers of "in" and "out" guesses, on
    1/50, 1/20, 1/10, 1/5, 1/2 and all of the canaries in total (Steinke et al. vary the
    share of canaries guessed on from a few per cent to all of them)."""
    counts = sorted({max(1, m // d) for d in (100, 40, 20, 10, 4, 2)})
    return [(k, k) for k in counts]


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> OneRunAudit:
    """The one-run audit of canaries with membership ``scores`` (higher: more likely in)
    and their true inclusion ``included`` (bool), at ``confidence``.

    Guesses: "in" for the ``k+`` highest scores, "out" for the ``k-`` lowest (ties broken
    by index, a fixed rule independent of inclusion), for each pair of ``guess_counts``
    (default :func:`default_guess_counts`); the reported bound is the largest over the
    pairs, each computed at ``(1 - confidence) / len(pairs)`` (Bonferroni).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise ValueError(
            f"scores and included must be 1-D of the same length, got {scores.shape} and "
            f"{included.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    pairs = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not pairs or any(k_in < 0 or k_out < 0 or k_in + k_out > m for k_in, k_out in pairs):
        raise ValueError(f"guess counts must be (k+, k-) >= 0 with k+ + k- <= {m}, got {pairs}")
    order = np.argsort(-scores, kind="stable")  # highest score first
    level = (1 - confidence) / len(pairs)
    results = []
    for k_in, k_out in pairs:
        top, bottom = order[:k_in], order[m - k_out :]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        guesses = k_in + k_out
        results.append(
            AuditGuess(
                k_in=k_in,
                k_out=k_out,
                guesses=guesses,
                correct=correct,
                epsilon=epsilon_lower_bound(
                    m=m, r=guesses, v=correct, delta=delta, significance=level
                ),
            )
        )
    best = max(results, key=lambda g: g.epsilon)
    return OneRunAudit(
        epsilon_lower_bound=best.epsilon,
        confidence=confidence,
        delta=delta,
        canaries=m,
        included=int(included.sum()),
        best=best,
        guesses=results,
    )
