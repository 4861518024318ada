"""The one-run audit's bound (Steinke, Nasr and Jagielski, NeurIPS 2023) on mechanisms whose
epsilon is known: it must stay at or below that epsilon at the stated confidence, and be
large when there is no noise."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from fedmm.simulations.privacy.one_run_audit import (
    audit_from_scores,
    default_guess_counts,
    epsilon_lower_bound,
    one_run_p_value,
)

CANARIES = 1000
DELTA = 1e-5
CONFIDENCE = 0.95
TRIALS = 60


def _inclusion(seed: int) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, rng.random(CANARIES) < 0.5


def _gaussian_counts(epsilon: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per canary, its count (1 in, 0 out) plus Gaussian noise calibrated to
    (epsilon, DELTA) for sensitivity 1: each canary's inclusion is (epsilon, DELTA)-DP."""
    rng, included = _inclusion(seed)
    sigma = dp_accounting.get_sigma_gaussian(epsilon, DELTA)
    return included + rng.normal(size=CANARIES) * sigma, included


def _randomized_response(epsilon: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per canary, its inclusion bit kept with probability e^eps / (1 + e^eps): exactly
    epsilon-DP, the mechanism the audit's null hypothesis is tight for."""
    rng, included = _inclusion(seed)
    keep = rng.random(CANARIES) < 1 / (1 + math.exp(-epsilon))
    return np.where(keep, included, ~included).astype(float), included


def test_p_value_matches_binomial_tail_without_delta() -> None:
    # delta = 0: Theorem 3.1, the upper tail of Binomial(r, e^eps / (1 + e^eps))
    from scipy import stats

    q = 1 / (1 + math.exp(-1.0))
    expected = stats.binom.sf(69, 100, q)
    assert one_run_p_value(m=500, r=100, v=70, epsilon=1.0, delta=0) == pytest.approx(expected)
    # delta > 0 can only raise the p-value (a weaker null is harder to refute)
    assert one_run_p_value(m=500, r=100, v=70, epsilon=1.0, delta=1e-3) > expected


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The p-value as Steinke et al. state it step by step (a plain loop over i)."""
    from scipy import stats

    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, window / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(1000, 100, 80, 1.0, 1e-5), (400, 200, 153, 0.5, 1e-5), (1000, 40, 40, 3.0, 1e-3),
     (50, 10, 6, 0.2, 0.01), (1000, 1000, 700, 0.0, 1e-5)],
)  # fmt: skip
def test_p_value_matches_the_papers_computation(m, r, v, eps, delta) -> None:
    ours = one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)
    assert ours == pytest.approx(_paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_p_value_falls_as_epsilon_is_smaller() -> None:
    values = [one_run_p_value(m=1000, r=200, v=150, epsilon=e, delta=DELTA) for e in (0, 1, 2)]
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_gaussian_mechanism_bound_stays_below_its_epsilon(epsilon: float) -> None:
    bounds = [
        audit_from_scores(*_gaussian_counts(epsilon, seed), delta=DELTA).epsilon_lower_bound
        for seed in range(TRIALS)
    ]
    # at 95% confidence at most ~5% of runs may exceed; the one-run audit is loose for
    # the Gaussian mechanism, so none should
    assert sum(b > epsilon for b in bounds) <= math.ceil((1 - CONFIDENCE) * TRIALS)
    # and it is not vacuous: the audit sees a good part of a large epsilon
    if epsilon >= 3:
        assert np.mean(bounds) > 0.25 * epsilon


def test_randomized_response_bound_holds_at_the_stated_confidence() -> None:
    epsilon, trials = 2.0, 200
    bounds = [
        audit_from_scores(*_randomized_response(epsilon, seed), delta=0).epsilon_lower_bound
        for seed in range(trials)
    ]
    exceed = sum(b > epsilon for b in bounds)
    # P[Binomial(200, 0.05) > 18] < 0.2%: more means the bound is not valid
    assert exceed <= 18, f"{exceed} of {trials} bounds above epsilon {epsilon}"
    assert np.median(bounds) > 1.0  # tight mechanism: the bound comes close


def test_a_claim_weaker_than_the_mechanism_is_refuted() -> None:
    # randomized response at epsilon 6 claimed as epsilon 2: the audit must see more than 2
    bounds = [
        audit_from_scores(*_randomized_response(6.0, seed), delta=DELTA).epsilon_lower_bound
        for seed in range(10)
    ]
    assert min(bounds) > 2.0


def test_no_noise_gives_a_large_bound() -> None:
    _, included = _inclusion(0)
    audit = audit_from_scores(included.astype(float), included, delta=DELTA)
    assert audit.epsilon_lower_bound > 4.0  # 1,000 canaries at delta 1e-5: at most ~4.7
    assert audit.best.correct == audit.best.guesses


def test_scores_that_carry_no_information_give_no_bound() -> None:
    rng, included = _inclusion(1)
    audit = audit_from_scores(rng.normal(size=CANARIES), included, delta=DELTA)
    assert audit.epsilon_lower_bound < 0.5


def test_bonferroni_level_is_used_for_each_guess_count() -> None:
    rng, included = _inclusion(2)
    scores = included + rng.normal(size=CANARIES)
    audit = audit_from_scores(scores, included, delta=DELTA)
    pairs = default_guess_counts(CANARIES)
    level = (1 - CONFIDENCE) / len(pairs)
    best = audit.best
    assert audit.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(
            m=CANARIES, r=best.guesses, v=best.correct, delta=DELTA, significance=level
        )
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": np.zeros(3), "included": np.zeros(4, bool)}, "same length"),
        ({"scores": np.array([np.nan]), "included": np.ones(1, bool)}, "finite"),
        (
            {"scores": np.zeros(4), "included": np.zeros(4, bool), "guess_counts": [(3, 3)]},
            "k\\+ \\+ k-",
        ),
    ],
)
def test_bad_input_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        audit_from_scores(delta=DELTA, **kwargs)
