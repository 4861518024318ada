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
) -> list[tuple[int, float, list[float]]]:
    """DP-SGD of a linear classifier; returns ``(step, accuracy, accuracies of the weights
    averaged with each of average_decays)`` at ``evaluate_at``
    (``common.parameter_averaging``)."""
    n, dim = features.shape
    generator = torch.Generator().manual_seed(seed)
    weight, bias = torch.zeros(CLASSES, dim), torch.zeros(CLASSES)
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    averages = [{"weight": weight.clone(), "bias": bias.clone()} for _ in average_decays]
    expected_batch = sampling_rate * n
    results = []
    for step in range(1, steps + 1):
        chosen = torch.rand(n, generator=generator) < sampling_rate
        x, y = features[chosen], labels[chosen]
        error = torch.softmax(x @ weight.T + bias, dim=1)
        error[torch.arange(len(y)), y] -= 1.0
        norms = error.norm(dim=1) * (x.square().sum(1) + 1.0).sqrt()
        factors = clip_factors(norms, clip)
        weighted = error * factors[:, None]
        grad_w = weighted.T @ x + noise * clip * torch.randn(weight.shape, generator=generator)
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
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    data_dir = str(args.data_dir) if args.data_dir else None
    train = benchmark_train_records(data_dir, pii_fraction=0.0)
    test = benchmark_test_set(data_dir)
    train_x = normalised_features(torch.from_numpy(train.images[: args.records]))
    train_y = torch.from_numpy(train.labels[: args.records])
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
    )
    print(
        json.dumps(
            {
                "records": len(train_y),
                "sampling_rate": args.sampling_rate,
                "steps": args.steps,
                "epsilon": None if args.noise is not None else args.epsilon,
                "delta": args.delta,
                "noise_multiplier": round(noise, 4),
                "clip": args.clip,
                "learning_rate": args.learning_rate,
                "momentum": args.momentum,
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
