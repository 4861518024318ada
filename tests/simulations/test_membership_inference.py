"""Membership inference: ROC metrics, the loss-threshold attack and offline LiRA
(Carlini et al., IEEE S&P 2022), on synthetic scores with known answers and on real models
trained here (no Flower): an overfit non-private model must be attacked successfully."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.simulations.privacy.attack_metrics import AttackSummary, roc_curve
from fedmm.simulations.privacy.membership_inference import (
    loss_threshold_scores,
    offline_lira_scores,
)
from fedmm.simulations.privacy.membership_scores import build_queries, membership_signals
from fedmm.simulations.privacy.shadow_training import FederatedRecipe, train_shadow_federation

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def _labels(members: int, non_members: int) -> np.ndarray:
    return np.r_[np.ones(members, bool), np.zeros(non_members, bool)]


# --- ROC, AUC, TPR at low FPR --------------------------------------------------------------


def test_perfect_and_reversed_and_tied_scores() -> None:
    is_member = _labels(3, 5)
    perfect = roc_curve(np.r_[[9.0, 8, 7], [1.0, 2, 3, 4, 5]], is_member)
    assert perfect.auc() == 1.0
    assert perfect.tpr_at_fpr(0.0) == 1.0
    reversed_ = roc_curve(np.r_[[1.0, 2, 3], [4.0, 5, 6, 7, 8]], is_member)
    assert reversed_.auc() == 0.0
    assert reversed_.tpr_at_fpr(0.5) == 0.0
    tied = roc_curve(np.zeros(8), is_member)
    assert tied.auc() == 0.5
    assert tied.tpr_at_fpr(0.99) == 0.0  # one threshold flags all or nothing


def test_tpr_at_fpr_by_hand() -> None:
    # ranked best first: member, non-member, member, member, then six non-members
    scores = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], float)
    is_member = np.array([1, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    curve = roc_curve(scores, is_member)
    assert curve.num_members == 3 and curve.num_non_members == 7
    assert curve.tpr_at_fpr(0.0) == pytest.approx(1 / 3)  # only the top record, no FP
    assert curve.tpr_at_fpr(1 / 7) == pytest.approx(1.0)  # one FP buys the other two
    # Mann-Whitney: member-above-non-member pairs / all pairs = (7 + 6 + 6) / 21
    assert curve.auc() == pytest.approx(19 / 21)


def test_auc_of_shifted_gaussians_matches_the_binormal_formula() -> None:
    rng = np.random.default_rng(3)
    shift = 1.0
    scores = np.r_[rng.normal(shift, 1, 20_000), rng.normal(0, 1, 20_000)]
    curve = roc_curve(scores, _labels(20_000, 20_000))
    expected = 0.5 * (1 + math.erf(shift / 2))  # Phi(shift / sqrt(2))
    assert curve.auc() == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    ("scores", "is_member", "message"),
    [
        (np.zeros(3), np.array([True, False]), "same length"),
        (np.zeros(2), np.array([1, 0]), "boolean"),
        (np.array([np.nan, 1.0]), np.array([True, False]), "finite"),
        (np.zeros(2), np.array([True, True]), "one member and one non-member"),
    ],
)
def test_roc_rejects_bad_input(scores, is_member, message) -> None:
    with pytest.raises(ValueError, match=message):
        roc_curve(scores, is_member)


def test_tpr_at_fpr_rejects_rates_outside_0_1() -> None:
    with pytest.raises(ValueError, match="max_fpr"):
        roc_curve(np.r_[1.0, 0.0], _labels(1, 1)).tpr_at_fpr(1.5)


# --- offline LiRA on synthetic confidences --------------------------------------------------


def _heterogeneous_population(rng: np.random.Generator, n: int, shadows: int, shift: float):
    """Records of very different difficulty: each has its own OUT mean and spread. Members'
    confidence sits ``shift`` of their own sigmas above their OUT mean."""
    mean = rng.normal(0, 4, size=(n, 1))
    std = rng.uniform(0.2, 2.0, size=(n, 1))
    shadow = mean + std * rng.normal(size=(shadows, n, 1))
    members = np.arange(n) < n // 2
    target = mean + std * rng.normal(size=(n, 1))
    target[members] += shift * std[members]
    return target, shadow, members


def test_lira_beats_the_global_threshold_when_records_differ_in_difficulty() -> None:
    rng = np.random.default_rng(0)
    target, shadow, members = _heterogeneous_population(rng, 4000, shadows=16, shift=3.0)
    lira = AttackSummary.of("lira", roc_curve(offline_lira_scores(target, shadow), members))
    # the global threshold sees the confidence itself (minus the "loss")
    threshold = AttackSummary.of("loss", roc_curve(loss_threshold_scores(-target), members))
    assert lira.auc > 0.9
    assert threshold.auc < 0.75  # difficulty spreads hide the shift from one threshold
    assert lira.tpr_at_1_fpr > 0.3 > threshold.tpr_at_1_fpr


def test_lira_on_non_members_only_is_chance() -> None:
    rng = np.random.default_rng(1)
    target, shadow, members = _heterogeneous_population(rng, 4000, shadows=16, shift=0.0)
    for variance in ("per-example", "global"):
        scores = offline_lira_scores(target, shadow, variance=variance)  # type: ignore[arg-type]
        assert abs(roc_curve(scores, members).auc() - 0.5) < 0.04


def test_lira_is_one_sided_and_combines_queries() -> None:
    shadow = np.array([[[0.0, 0.0]], [[2.0, 2.0]]])  # mean 1, std sqrt(2), per query
    higher = offline_lira_scores(np.array([[3.0, 3.0]]), shadow)
    lower = offline_lira_scores(np.array([[-1.0, -1.0]]), shadow)
    assert higher[0] == pytest.approx(2 / math.sqrt(2))
    assert lower[0] == pytest.approx(-2 / math.sqrt(2))  # below OUT: less likely a member


@pytest.mark.parametrize(
    ("target", "shadow", "message"),
    [
        (np.zeros((3, 1)), np.zeros((1, 3, 1)), "at least 2 shadow"),
        (np.zeros((3, 1)), np.zeros((2, 4, 1)), "same records"),
        (np.zeros(3), np.zeros((2, 3)), "records, queries"),
        (np.full((1, 1), np.inf), np.zeros((2, 1, 1)), "finite"),
    ],
)
def test_lira_rejects_bad_input(target, shadow, message) -> None:
    with pytest.raises(ValueError, match=message):
        offline_lira_scores(target, shadow)


def test_loss_threshold_rejects_a_flat_array() -> None:
    with pytest.raises(ValueError, match="records, queries"):
        loss_threshold_scores(np.zeros(4))


# --- real models: an overfit non-private model leaks membership ----------------------------

needs_data = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overfit_recipe(epsilon: float = math.inf) -> FederatedRecipe:
    return FederatedRecipe(
        rounds=1,
        local_epochs=60,  # at 40 the overfit sat at the edge of the first assertion
        batch_size=32,
        learning_rate=0.5,
        learning_rate_schedule="constant",
        momentum=0.0,
        optimizer="sgd",
        num_distractors=4,
        epsilon=epsilon,
        delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier_floor=0.0,
        server_learning_rate=1.0,
        update_clip=None,
        max_weight=None,
        model=ModelConfig(),
    )


@needs_data
def test_attacks_find_the_members_of_an_overfit_model() -> None:
    records = benchmark_train_records(None)
    order = np.random.default_rng(5).permutation(len(records))
    n = 128
    members, non_members = order[:n], order[n : 2 * n]
    targets = records.subset(np.r_[members, non_members])
    is_member = _labels(n, n)
    recipe = _overfit_recipe()
    target_model = train_shadow_federation([records.subset(members)], recipe, seed=1)
    queries = build_queries(
        targets, tokenizer=HashingTokenizer(), num_distractors=4, num_queries=2, seed=0
    )
    target = membership_signals(target_model, queries)
    shadows = []
    for j in range(3):  # public data: disjoint from every target
        public = order[2 * n + j * n : 2 * n + (j + 1) * n]
        model = train_shadow_federation([records.subset(public)], recipe, seed=10 + j)
        shadows.append(membership_signals(model, queries).scaled_confidence)
    loss = AttackSummary.of("loss", roc_curve(loss_threshold_scores(target.loss), is_member))
    lira = AttackSummary.of(
        "lira",
        roc_curve(offline_lira_scores(target.scaled_confidence, np.stack(shadows)), is_member),
    )
    assert target.loss[:n].mean() < 0.5 * target.loss[n:].mean()  # it did overfit
    assert loss.auc > 0.65, loss
    assert lira.auc > 0.65, lira
    assert loss.num_members == loss.num_non_members == n


@needs_data
def test_shadow_federation_averages_sites_and_calibrates_dp_like_a_site() -> None:
    from fedmm.client.privacy_ledger import epsilon_of
    from fedmm.client.training import sample_rate, steps_per_epoch

    recipe = FederatedRecipe(**{**_overfit_recipe(3.0).__dict__, "rounds": 2, "local_epochs": 1})
    noise = recipe.site_noise(300)
    assert noise is not None and noise.max_grad_norm == 1.0
    q, steps = sample_rate(300, 32), 2 * steps_per_epoch(300, 32)
    assert 2.9 < epsilon_of([(noise.noise_multiplier, q, steps)], 1e-5) <= 3.0
    assert _overfit_recipe().site_noise(300) is None
    records = benchmark_train_records(None)
    sites = [records.subset(np.arange(300)), records.subset(np.arange(300, 500))]
    first = train_shadow_federation(sites, recipe, seed=0)
    again = train_shadow_federation(sites, recipe, seed=0)
    differs = any(
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert differs  # DP noise is fresh randomness, as at a real site
    with pytest.raises(ValueError, match="at least one site"):
        train_shadow_federation(
            [ImageTextDataset(np.zeros((0, 28, 56), np.uint8), [], np.zeros(0, np.int64))],
            recipe,
            seed=0,
        )
