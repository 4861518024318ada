"""What a site sums under SecAgg+ and reports in the clear: no train loss (computed on its
private batches, covered by no accountant), and its epsilon bound rather than its spend."""

from __future__ import annotations

from fedmm.common.secure_round import (
    METRIC_EPSILON_BOUND,
    SUMMED_METRICS,
    metric_ranges,
    weighted_metrics,
)


def test_no_train_loss_is_summed() -> None:
    assert SUMMED_METRICS == ("steps",)
    assert weighted_metrics(weight=120, metrics={"steps": 3}) == {"steps": 360.0}
    assert set(metric_ranges(max_weight=1000, max_steps=4)) == set(SUMMED_METRICS)
    assert all("loss" not in name for name in SUMMED_METRICS)


def test_the_reported_key_names_a_bound() -> None:
    assert METRIC_EPSILON_BOUND == "epsilon_bound"
