"""The white-box one-run audit (gradient canaries, every iterate) of the site's DP-SGD step:
it has power without noise, stays at or below the accounted epsilon with the calibrated
noise, and catches a step whose noise or clipping is broken."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.client import secure_dp_sgd
from fedmm.client.secure_dp_sgd import SecureNoiseDPOptimizer, StepAudit, train_dp_sgd
from fedmm.client.training import MatchingDataset, TrainingRecipe
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.secure_random import aes_ctr_random_bytes
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.simulations.privacy.gradient_canary_audit import (
    max_certifiable_epsilon,
    place_canaries,
    run_gradient_canary_audit,
)
from fedmm.simulations.privacy.one_run_audit import audit_from_scores
from fedmm.simulations.privacy.sweep_report import (
    gradient_audit_markdown_table,
    gradient_audit_rows,
)

pytestmark = [
    pytest.mark.skipif(not DEFAULT_DATA_DIR.exists(), reason="needs dataset-fashion-mnist"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
]

CONFIG = ModelConfig(width=16, heads=2)
RECIPE = TrainingRecipe(batch_size=16, optimizer="sgd", learning_rate=0.1)
DELTA = 1e-5
CANARIES = 1000


@pytest.fixture(scope="module")
def records():
    return benchmark_train_records().subset(np.arange(64))  # q = 1/4 at batch 16


def _audit(records, *, epsilon: float, seed: int, steps: int = 32, **options):
    torch.set_num_threads(1)
    return run_gradient_canary_audit(
        records,
        model_config=CONFIG,
        recipe=RECIPE,
        epsilon=epsilon,
        delta=DELTA,
        max_grad_norm=1.0,
        steps=steps,
        canaries=CANARIES,
        key=bytes([seed]) * 32,
        random_bytes=aes_ctr_random_bytes(bytes([100 + seed]) * 32),
        **options,
    )


def test_without_noise_the_audit_certifies_a_large_epsilon(records) -> None:
    run = _audit(records, epsilon=math.inf, seed=1)
    assert run.noise_multiplier == 0 and math.isinf(run.epsilon_accounted)
    assert run.sample_rate == 0.25 and run.steps == 32
    assert 0.4 * CANARIES < run.audit.included < 0.6 * CANARIES
    assert run.mean_appearances_in == pytest.approx(8, abs=1)  # q * steps
    # every included canary adds C at each step it joins; the records barely touch its
    # coordinate
    assert run.mean_score_in > 6 and abs(run.mean_score_out) < 1
    assert run.audit.epsilon_lower_bound > 3
    assert run.audit.epsilon_lower_bound <= run.max_certifiable_epsilon < 6


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_with_calibrated_noise_the_bound_stays_below_the_accounted_epsilon(
    records, epsilon: float
) -> None:
    for seed in (2, 3, 4):
        run = _audit(records, epsilon=epsilon, seed=seed)
        assert run.epsilon_accounted == pytest.approx(epsilon, rel=2e-3)
        assert run.audit.epsilon_lower_bound <= run.epsilon_accounted
    assert run.audit.epsilon_lower_bound > 0  # the same audit is not blind at this noise


def test_a_step_with_a_quarter_of_the_calibrated_noise_is_caught(
    records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step draws noise at sigma / 4 while the accountant still charges sigma."""
    honest = SecureNoiseDPOptimizer.add_noise

    def quarter_noise(self: SecureNoiseDPOptimizer) -> None:
        calibrated = self.noise_multiplier
        self.noise_multiplier = calibrated / 4
        try:
            honest(self)
        finally:
            self.noise_multiplier = calibrated

    monkeypatch.setattr(SecureNoiseDPOptimizer, "add_noise", quarter_noise)
    run = _audit(records, epsilon=1.0, seed=5)
    assert run.epsilon_accounted == pytest.approx(1.0, rel=2e-3)
    assert run.audit.epsilon_lower_bound > run.epsilon_accounted


def test_oversized_canaries_are_clipped_and_unclipped_ones_are_caught(
    records, monkeypatch: pytest.MonkeyPatch
) -> None:
    clipped = _audit(records, epsilon=1.0, seed=6, canary_norm=10.0)
    assert clipped.audit.epsilon_lower_bound <= clipped.epsilon_accounted
    monkeypatch.setattr(secure_dp_sgd, "clip_factors", lambda norms, clip: torch.ones_like(norms))
    unclipped = _audit(records, epsilon=1.0, seed=6, canary_norm=10.0)
    assert unclipped.audit.epsilon_lower_bound > 3


def test_the_audit_gradients_join_the_clipped_sum_before_the_noise(records) -> None:
    """Without noise and without records (rate small), the released gradient is the
    clipped canary sum over the expected batch."""
    torch.manual_seed(0)
    model = CrossAttentionMatcher(CONFIG)
    name = "token_embed.weight"
    shape = dict(model.named_parameters())[name].shape
    extra = torch.zeros((2, *shape))
    extra[0].view(-1)[3] = 5.0  # clipped to 1
    extra[1].view(-1)[7] = 0.5  # kept
    seen = []
    dataset = MatchingDataset(
        records.subset(np.arange(1)),
        tokenizer=HashingTokenizer.for_model(CONFIG),
        num_distractors=4,
        seed=0,
    )
    train_dp_sgd(
        model,
        dataset,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        sample_rate=1e-9,  # no record joins
        steps=1,
        expected_batch_size=2.0,
        accountant_history=[],
        random_bytes=aes_ctr_random_bytes(bytes(32)),
        audit=StepAudit(
            extra_gradients=lambda step: {name: extra},
            observe=lambda step, released: seen.append(released[name].clone()),
        ),
    )
    flat = seen[0].view(-1)
    assert flat[3].item() == pytest.approx(1.0 / 2.0, rel=1e-5)
    assert flat[7].item() == pytest.approx(0.5 / 2.0, rel=1e-5)
    assert flat.abs().sum().item() == pytest.approx(0.75, rel=1e-5)


def test_canaries_take_distinct_coordinates_and_keyed_bits() -> None:
    model = CrossAttentionMatcher(CONFIG)
    placed = place_canaries(model, count=CANARIES, key=bytes(32))
    shapes = dict(model.named_parameters())
    pairs = set(zip(placed.names, placed.positions.tolist(), strict=True))
    assert len(pairs) == CANARIES
    assert all(0 <= pos < shapes[name].numel() for name, pos in pairs)
    again = place_canaries(model, count=CANARIES, key=bytes(32))
    assert (again.included == placed.included).all()
    other = place_canaries(model, count=CANARIES, key=bytes([1]) * 32)
    assert (other.included != placed.included).any()
    with pytest.raises(ValueError, match="gradient-audit-canaries"):
        place_canaries(model, count=10**9, key=bytes(32))


def test_the_most_1000_canaries_can_certify() -> None:
    def most(included: int) -> float:
        return max_certifiable_epsilon(
            canaries=1000, included=included, delta=DELTA, confidence=0.95
        )

    assert 5 < most(500) < 6  # all 1000 guesses right
    assert 4 < most(480) < most(500)  # then only the 500 guesses of k = 250 can all be right
    with pytest.raises(ValueError, match="included"):
        most(1001)


def test_the_committed_white_box_points_and_their_table() -> None:
    """The report's white-box table is what its committed points give, and each bound is
    what the points' canary scores give again."""
    root = Path(__file__).parents[2]
    folder = root / "docs" / "privacy-report" / "one-run-audit-whitebox" / "points"
    points = [
        json.loads((folder / f"whitebox-iid-eps-{epsilon}.json").read_text())
        for epsilon in ("inf", "8", "3", "1")
    ]
    for point in points:
        run = point["gradient_audit"]
        scores = point["canary_scores"]
        again = audit_from_scores(
            np.asarray(scores["scores"]),
            np.asarray(scores["included"]),
            delta=run["delta"],
            confidence=run["audit"]["confidence"],
        )
        assert again.epsilon_lower_bound == pytest.approx(run["audit"]["epsilon_lower_bound"])
    rows = gradient_audit_rows(points)
    assert rows[0]["epsilon_lower_bound"] == pytest.approx(rows[0]["max_certifiable_epsilon"])
    assert rows[0]["epsilon_lower_bound"] > 4
    for row in rows[1:]:
        assert row["epsilon_lower_bound"] <= row["epsilon_accounted"]
    report = (root / "docs" / "privacy-report.md").read_text()
    for line in gradient_audit_markdown_table(rows).splitlines()[2:]:
        assert line in report
