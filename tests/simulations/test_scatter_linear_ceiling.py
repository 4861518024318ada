"""The linear-readout ceiling benchmark clips each example's true gradient: its closed form
(an outer product of softmax error and features) equals autograd example by example, and it
learns a separable problem without noise and not with overwhelming noise."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from fedmm.simulations.benchmarks import scatter_linear_ceiling as ceiling


def _separable(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(ceiling.CLASSES, dim, generator=generator)
    labels = torch.randint(0, ceiling.CLASSES, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def _clipped_autograd_sums(
    x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums of the examples' gradients at zero weights, each clipped to norm ``clip`` as
    Opacus does; ``x`` ``(N, K, D)``: an example's loss is the mean over its K views."""
    expected_w = torch.zeros(ceiling.CLASSES, x.shape[-1])
    expected_b = torch.zeros(ceiling.CLASSES)
    for i in range(len(y)):
        w = torch.zeros(ceiling.CLASSES, x.shape[-1], requires_grad=True)
        b = torch.zeros(ceiling.CLASSES, requires_grad=True)
        functional.cross_entropy(x[i] @ w.T + b, y[i].repeat(x.shape[1])).backward()
        norm = torch.cat([w.grad.flatten(), b.grad]).norm()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        expected_w += factor * w.grad
        expected_b += factor * b.grad
    return expected_w, expected_b


def test_one_step_equals_clipped_autograd_gradients() -> None:
    x, y = _separable(12, 6, 0)
    clip, lr = 0.5, 0.1
    # The training starts from zero weights: the reference is autograd at zero.
    expected_w, expected_b = _clipped_autograd_sums(x[:, None], y, clip)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(w: torch.Tensor, b: torch.Tensor) -> float:
        seen.append((w.clone(), b.clone()))
        return 0.0

    # Sampling rate 1: every example, and the expected batch is the whole set.
    ceiling.train_linear_dp_sgd(
        x, y, sampling_rate=1.0, steps=1, clip=clip, noise=0.0, learning_rate=lr,
        momentum=0.0, seed=0, evaluate_at={1}, evaluate=record,
    )  # fmt: skip
    stepped_w, stepped_b = seen[0]
    torch.testing.assert_close(stepped_w, -lr * expected_w / len(y))
    torch.testing.assert_close(stepped_b, -lr * expected_b / len(y))


def test_it_learns_without_noise_and_not_under_overwhelming_noise() -> None:
    x, y = _separable(400, 8, 3)

    def accuracy(weight: torch.Tensor, bias: torch.Tensor) -> float:
        return float(((x @ weight.T + bias).argmax(1) == y).float().mean())

    def run(noise: float) -> float:
        return ceiling.train_linear_dp_sgd(
            x, y, sampling_rate=0.25, steps=60, clip=1.0, noise=noise, learning_rate=2.0,
            momentum=0.5, seed=0, evaluate_at={60}, evaluate=accuracy,
        )[0][1]  # fmt: skip

    assert run(0.0) > 0.95
    assert run(1e4) < 0.5


@pytest.mark.parametrize("clip", [0.3, 100.0])  # every example clipped; none
def test_views_average_each_examples_gradient_before_clipping(clip: float) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 5, generator=generator)  # 8 examples, 3 views each
    y = torch.randint(0, ceiling.CLASSES, (8,), generator=generator)
    lr = 0.5
    expected_w, expected_b = _clipped_autograd_sums(x, y, clip)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    ceiling.train_linear_dp_sgd(
        x, y, sampling_rate=1.0, steps=1, clip=clip, noise=0.0, learning_rate=lr,
        momentum=0.0, seed=0, evaluate_at={1},
        evaluate=lambda w, b: seen.append((w.clone(), b.clone())) or 0.0,
    )  # fmt: skip
    torch.testing.assert_close(seen[0][0], -lr * expected_w / len(y))
    torch.testing.assert_close(seen[0][1], -lr * expected_b / len(y))


def test_translated_views_keep_the_canvas_and_shift_copies_of_it() -> None:
    canvases = torch.zeros(50, 12, 16, dtype=torch.uint8)
    canvases[:, 4:8, 5:9] = torch.arange(1, 17, dtype=torch.uint8).reshape(4, 4)
    views = ceiling.translated_views(canvases, 3, seed=0)
    assert views.shape == (50, 3, 12, 16)
    assert torch.equal(views[:, 0], canvases)
    shifted = 0
    for i in range(50):
        for view in views[i, 1:]:
            rows, cols = torch.nonzero(view == 1)[0].tolist()  # where the item's corner went
            dy, dx = rows - 4, cols - 5
            assert abs(dy) <= 2 and abs(dx) <= 2
            assert torch.equal(view, torch.roll(canvases[i], (dy, dx), (0, 1)))
            shifted += (dy, dx) != (0, 0)
    assert shifted > 80  # most of the 100 copies moved (1 in 25 stays where it was)


def test_a_public_start_is_where_the_private_run_begins() -> None:
    x, y = _separable(300, 8, 5)
    weight, bias = ceiling.pretrain_on_public(x[:100], y[:100], epochs=50, learning_rate=0.1)

    def accuracy(w: torch.Tensor, b: torch.Tensor) -> float:
        return float(((x[100:] @ w.T + b).argmax(1) == y[100:]).float().mean())

    assert accuracy(weight, bias) > 0.9
    start = ceiling.train_linear_dp_sgd(
        x[100:], y[100:], sampling_rate=0.5, steps=1, clip=1.0, noise=0.0, learning_rate=0.0,
        momentum=0.0, seed=0, evaluate_at={1}, evaluate=accuracy, initial=(weight, bias),
    )[0][1]  # fmt: skip
    assert start == accuracy(weight, bias)


def test_view_features_are_each_views_normalised_features() -> None:
    canvases = torch.randint(0, 256, (3, 2, 8, 12), dtype=torch.uint8)
    for views in (canvases[:, :1], canvases):
        features = ceiling.view_features(views)
        assert features.shape[:2] == views.shape[:2]
        for view in range(views.shape[1]):
            expected = ceiling.normalised_features(views[:, view])
            torch.testing.assert_close(features[:, view], expected)
