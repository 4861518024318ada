"""What a linear readout of the scattering features reaches under DP-SGD, given the labels.

The ceiling of the ``scatter-linear`` encoder's recipe: Tramer and Boneh's "ScatterNet +
linear" ("Differentially Private Learning Needs Better Features (or Much More Data)", ICLR
2021; 89.7% on Fashion-MNIST at epsilon 3), run on the built-in benchmark's training
canvases (singles and two-item scenes, labelled by their left item) with this project's
sampling, clipping and accountant: a 10-class linear classifier of the GroupNorm'd (27
groups, no trained scale or shift) scattering features, Poisson sampling at ``--sampling-rate``,
``--steps`` steps, per-example clipping at ``--clip`` (exact: an example's gradient is the
outer product of its softmax error and its features), Gaussian noise calibrated by the RDP
accountant to ``--epsilon`` (``client.privacy_ledger.calibrate_noise_multiplier``), SGD with
momentum, evaluated on the 10,000 test singles.

The caption model learns the same map through its text side (class words against their
swaps), so its accuracy is bounded by, and can be compared with, this figure. ``--noise``
sets sigma directly instead (e.g. to mimic site-local DP: sites' independent noise averaged
over n sites is sqrt(n) times the noise of one pooled batch).

Two levers of the DP literature, each off by default:

- ``--views K``: augmentation multiplicity (De et al., "Unlocking High-Accuracy
  Differentially Private Image Classification through Scale", 2022): an example's gradient
  is the mean of its gradients on K views (the canvas and K - 1 translations by up to 2
  pixels), clipped once, so the privacy cost is unchanged. The views are drawn once per
  record (their features computed once), not afresh at every step as in the paper.
- ``--public-records P``: P of the ``--records`` records, drawn at random, are declared
  public and train the classifier without noise first (``--public-epochs`` epochs of
  full-batch Adam); DP-SGD on the other records starts from it. The public records are never
  part of the private run's data, so the accounted epsilon covers the private records only.

    python -m fedmm.simulations.benchmarks.scatter_linear_ceiling --sampling-rate 0.15 --steps 350
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fedmm.client.per_example_gradients import clip_factors
from fedmm.client.privacy_ledger import calibrate_noise_multiplier
from fedmm.common.data.benchmark import benchmark_test_set, benchmark_train_records
from fedmm.common.model import SCATTER_GROUPS
from fedmm.common.parameter_averaging import average_parameters
from fedmm.common.scattering import CHANNELS, scattering_features
from fedmm.simulations.centralised_reference import public_split

CLASSES = 10


def normalised_features(canvases: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """GroupNorm'd scattering features ``(N, 81 * H/4 * W/4)`` of uint8 canvases."""
    norm = nn.GroupNorm(SCATTER_GROUPS, CHANNELS, affine=False)
    parts = []
    with torch.no_grad():
        for start in range(0, len(canvases), chunk):
            images = canvases[start : start + chunk].float() / 255.0
            parts.append(norm(scattering_features(images)).flatten(1))
    return torch.cat(parts)


def view_features(views: torch.Tensor) -> torch.Tensor:
    """``(N, K, D)`` normalised features of ``(N, K, H, W)`` uint8 views, filled one view at a
    time (a view's float features take about 20 times the bytes of its uint8 pixels)."""
    first = normalised_features(views[:, 0])
    if views.shape[1] == 1:
        return first[:, None]
    out = first.new_empty(len(first), views.shape[1], first.shape[1])
    out[:, 0] = first
    for view in range(1, views.shape[1]):
        out[:, view] = normalised_features(views[:, view])
    return out


def translated_views(canvases: torch.Tensor, views: int, seed: int, shift: int = 2) -> torch.Tensor:
    """``(N, views, H, W)`` uint8: each canvas, then ``views - 1`` copies translated by a
    random offset of up to ``shift`` pixels on each axis (zero fill), drawn per record."""
    generator = torch.Generator().manual_seed(seed)
    n, height, width = canvases.shape
    padded = nn.functional.pad(canvases, (shift, shift, shift, shift))
    out = canvases[:, None].repeat(1, views, 1, 1)
    for view in range(1, views):
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
        for dy in range(2 * shift + 1):
            for dx in range(2 * shift + 1):
                rows = torch.nonzero((offsets[:, 0] == dy) & (offsets[:, 1] == dx))[:, 0]
                out[rows, view] = padded[rows, dy : dy + height, dx : dx + width]
    return out


def pretrain_on_public(
    features: torch.Tensor, labels: torch.Tensor, *, epochs: int, learning_rate: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear classifier trained without noise on public records (full-batch Adam on the
    cross-entropy): the starting point of the private run."""
    weight = torch.zeros(CLASSES, features.shape[1], requires_grad=True)
    bias = torch.zeros(CLASSES, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=learning_rate)
    for _ in range(epochs):
        optimiser.zero_grad()
        nn.functional.cross_entropy(features @ weight.T + bias, labels).backward()
        optimiser.step()
    return weight.detach(), bias.detach()


def train_linear_dp_sgd(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    sampling_rate: float,
    steps: int,
    clip: float,
    noise: float,
    learning_rate: float,
    momentum: float,
    seed: int,
    evaluate_at: set[int],
    evaluate: Callable[[torch.Tensor, torch.Tensor], float],
    average_decays: tuple[float, ...] = (),
    initial: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[int, float, list[float]]]:
    """DP-SGD of a linear classifier; returns ``(step, accuracy, accuracies of the weights
    averaged with each of average_decays)`` at ``evaluate_at``
    (``common.parameter_averaging``). ``features`` ``(N, D)``, or ``(N, K, D)`` for K views
    of each record: an example's gradient is then the mean over its views, clipped once.
    ``initial``: the starting weight and bias (zeros otherwise)."""
    if features.dim() == 2:
        features = features[:, None]
    n, views, dim = features.shape
    generator = torch.Generator().manual_seed(seed)
    weight, bias = torch.zeros(CLASSES, dim), torch.zeros(CLASSES)
    if initial is not None:
        weight, bias = initial[0].clone(), initial[1].clone()
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    averages = [{"weight": weight.clone(), "bias": bias.clone()} for _ in average_decays]
    expected_batch = sampling_rate * n
    results = []
    for step in range(1, steps + 1):
        chosen = torch.rand(n, generator=generator) < sampling_rate
        x, y = features[chosen].float(), labels[chosen]  # (B, K, D)
        error = torch.softmax(x @ weight.T + bias, dim=2)  # (B, K, classes)
        error[torch.arange(len(y)), :, y] -= 1.0
        error = error / views  # the mean over views
        # |sum_k e_k x_k^T|^2 = sum_kl (e_k . e_l)(x_k . x_l), plus the bias' |sum_k e_k|^2
        norms = (
            (error @ error.transpose(1, 2) * (x @ x.transpose(1, 2))).sum((1, 2))
            + error.sum(1).square().sum(1)
        ).sqrt()
        factors = clip_factors(norms, clip)
        weighted = (error * factors[:, None, None]).flatten(0, 1)
        grad_w = weighted.T @ x.flatten(0, 1)
        grad_w += noise * clip * torch.randn(weight.shape, generator=generator)
        grad_b = weighted.sum(0) + noise * clip * torch.randn(bias.shape, generator=generator)
        velocity_w = momentum * velocity_w + grad_w / expected_batch
        velocity_b = momentum * velocity_b + grad_b / expected_batch
        weight -= learning_rate * velocity_w
        bias -= learning_rate * velocity_b
        averages = [
            average_parameters(kept, {"weight": weight, "bias": bias}, decay=decay, step=step)
            for kept, decay in zip(averages, average_decays, strict=True)
        ]
        if step in evaluate_at:
            averaged = [evaluate(kept["weight"], kept["bias"]) for kept in averages]
            results.append((step, evaluate(weight, bias), averaged))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampling-rate", type=float, default=0.15)
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--noise", type=float, help="sigma (default: calibrated to epsilon)")
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=16.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--records", type=int, default=51_300, help="training records used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--average-decays", type=float, nargs="*", default=[], help="EMAs of the weights"
    )
    parser.add_argument("--views", type=int, default=1, help="augmentation multiplicity")
    parser.add_argument(
        "--public-records", type=int, default=0, help="records declared public, pretrained on"
    )
    parser.add_argument("--public-epochs", type=int, default=100)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    data_dir = str(args.data_dir) if args.data_dir else None
    train = benchmark_train_records(data_dir, pii_fraction=0.0)
    test = benchmark_test_set(data_dir)
    rows = public_split(args.records, args.public_records, args.seed)
    public, private = (torch.from_numpy(part) for part in rows)
    images = torch.from_numpy(train.images[: args.records])
    labels = torch.from_numpy(train.labels[: args.records]).long()
    train_x = view_features(translated_views(images[private], args.views, seed=args.seed))
    train_y = labels[private]
    initial = None
    if args.public_records:
        initial = pretrain_on_public(
            normalised_features(images[public]), labels[public], epochs=args.public_epochs
        )
    test_x = normalised_features(torch.from_numpy(test.singles))
    test_y = torch.from_numpy(test.single_labels).long()
    features_s = time.monotonic() - started
    noise = args.noise
    if noise is None:
        noise = calibrate_noise_multiplier(
            epsilon=args.epsilon,
            delta=args.delta,
            sample_rate=args.sampling_rate,
            steps=args.steps,
        )

    def accuracy(weight: torch.Tensor, bias: torch.Tensor) -> float:
        return float(((test_x @ weight.T + bias).argmax(1) == test_y).float().mean())

    checkpoints = {max(1, round(args.steps * k / 5)) for k in range(1, 6)}
    trained = time.monotonic()
    curve = train_linear_dp_sgd(
        train_x,
        train_y,
        sampling_rate=args.sampling_rate,
        steps=args.steps,
        clip=args.clip,
        noise=noise,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        seed=args.seed,
        evaluate_at=checkpoints,
        evaluate=accuracy,
        average_decays=tuple(args.average_decays),
        initial=initial,
    )
    print(
        json.dumps(
            {
                "records": len(train_y),  # private
                "sampling_rate": args.sampling_rate,
                "steps": args.steps,
                "epsilon": None if args.noise is not None else args.epsilon,
                "delta": args.delta,
                "noise_multiplier": round(noise, 4),
                "clip": args.clip,
                "learning_rate": args.learning_rate,
                "momentum": args.momentum,
                "views": args.views,
                "public_records": args.public_records,
                "public_accuracy": round(accuracy(*initial), 4) if initial else None,
                "accuracy_by_step": [[s, round(a, 4)] for s, a, _ in curve],
                "averaged_accuracy_by_step": {
                    str(decay): [[s, round(a[i], 4)] for s, _, a in curve]
                    for i, decay in enumerate(args.average_decays)
                },
                "features_s": round(features_s, 1),
                "training_s": round(time.monotonic() - trained, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
