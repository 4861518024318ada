"""Federated evaluation's counts against a brute-force computation of the same definitions
(``common.federated_eval``): recall@k hits both ways with ties counted against the query,
the shuffled control, the chance level min(k, n), and the summed vector."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.common.federated_eval import (
    EvaluationCounts,
    chance_hits,
    recall_hits,
    retrieval_counts,
)


def _brute_force_hits(scores: np.ndarray, relevant: list[int], k: int) -> int:
    """Query by query: the relevant item is a hit when fewer than k other items score at
    least as high as it does."""
    hits = 0
    for row, target in enumerate(relevant):
        better_or_equal = sum(
            1
            for column in range(scores.shape[1])
            if column != target and scores[row, column] >= scores[row, target]
        )
        hits += better_or_equal < k
    return hits


@pytest.mark.parametrize("n", [1, 3, 10, 11, 37])
@pytest.mark.parametrize("ties", [False, True])
def test_recall_counts_match_brute_force(n: int, ties: bool) -> None:
    rng = np.random.default_rng(n + 100 * ties)
    scores = rng.normal(size=(n, n))
    if ties:  # coarse scores: many equal pairs
        scores = np.round(scores)
    scores[np.arange(n), np.arange(n)] += rng.normal(size=n)  # some signal on the diagonal
    permutation = rng.permutation(n)
    counts = retrieval_counts(scores, permutation=permutation, bank=(min(n, 2), n))
    own = list(range(n))
    for k in (1, 5, 10):
        assert getattr(counts, f"i2t_hits_{k}") == _brute_force_hits(scores, own, k)
        assert getattr(counts, f"t2i_hits_{k}") == _brute_force_hits(scores.T, own, k)
    assert counts.i2t_shuffled_hits_10 == _brute_force_hits(scores, list(permutation), 10)
    assert counts.chance_hits_10 == min(10, n) and counts.records == n
    assert (counts.bank_hits, counts.bank_records) == (min(n, 2), n)


def test_constant_scores_get_no_hit_beyond_chance() -> None:
    """A model that scores every pair the same must not look perfect: ties go against it."""
    hits = recall_hits(np.zeros((30, 30)), np.arange(30), ks=(1, 10))
    assert hits == {1: 0, 10: 0}
    assert recall_hits(np.zeros((8, 8)), np.arange(8), ks=(10,)) == {10: 8}  # n <= k


def test_chance_is_the_expected_recall_of_random_scores() -> None:
    rng = np.random.default_rng(0)
    n, trials = 25, 400
    total = sum(
        recall_hits(rng.normal(size=(n, n)), np.arange(n), ks=(10,))[10] for _ in range(trials)
    )
    assert chance_hits(n, 10) == 10
    assert abs(total / (trials * n) - 10 / n) < 0.02  # 10000 queries: sd about 0.005


def test_summed_counts_round_trip_and_give_federation_rates() -> None:
    a = EvaluationCounts(records=40, i2t_hits_1=4, i2t_hits_5=12, i2t_hits_10=20, chance_hits_10=10)
    b = EvaluationCounts(records=8, i2t_hits_1=1, i2t_hits_5=5, i2t_hits_10=8, chance_hits_10=8)
    total = EvaluationCounts.from_vector(a.to_vector() + b.to_vector())
    assert total == a + b
    rates = total.rates()
    assert rates["records"] == 48
    assert rates["r_at_10_i2t"] == 28 / 48 and rates["chance_r_at_10"] == 18 / 48
    assert "caption_bank_accuracy" not in rates  # no bank in use
    with pytest.raises(ValueError, match="integers"):
        EvaluationCounts.from_vector(np.full(EvaluationCounts.length(), 0.5))
    with pytest.raises(ValueError, match="exceeds"):
        EvaluationCounts(records=2, i2t_hits_1=3)
