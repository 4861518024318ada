"""The coordinator's step on the revealed sum is torch's SGD on gamma * S / (q N)."""

from __future__ import annotations

import numpy as np
import torch

from fedmm.common.distributed_dp.plan import DistributedDPPlan
from fedmm.server.checkpoints import load_latest_checkpoint, save_checkpoint
from fedmm.server.distributed_dp import noisy_gradient_step

PLAN = DistributedDPPlan(
    sample_rate=0.1,
    num_rounds=5,
    clip_norm=1.0,
    integer_clip=1000.0,
    dimension=12,
    share_variance=1e4,
    min_honest_sites=3,
    epsilon=3.0,
    delta=1e-5,
)


def momentum_steps(weights, velocity, sums):
    """``noisy_gradient_step`` over ``sums`` (lr 0.5, momentum 0.9, 2,000 records)."""
    for summed in sums:
        weights = noisy_gradient_step(
            weights,
            summed,
            total_records=2000,
            plan=PLAN,
            learning_rate=0.5,
            momentum=0.9,
            velocity=velocity,
        )
    return weights


def test_step_matches_torch_sgd_with_momentum() -> None:
    rng = np.random.default_rng(1)
    weights = {"w": torch.randn(3, 4, dtype=torch.float64)}
    parameter = torch.nn.Parameter(weights["w"].clone())
    optimizer = torch.optim.SGD([parameter], lr=0.5, momentum=0.9)
    velocity: dict[str, torch.Tensor] = {}
    for _ in range(3):
        summed = {"w": rng.integers(-5000, 5000, (3, 4)).astype(np.float64)}
        weights = momentum_steps(weights, velocity, [summed])
        parameter.grad = torch.from_numpy(summed["w"] * PLAN.scale / (0.1 * 2000))
        optimizer.step()
    assert torch.allclose(weights["w"], parameter.detach(), atol=1e-12)


def test_momentum_survives_a_checkpoint_round_trip(tmp_path) -> None:
    """Interrupted after two steps and resumed from the checkpoint, the steps equal an
    uninterrupted run (the velocity is stored with the weights)."""
    rng = np.random.default_rng(2)
    sums = [{"w": rng.integers(-5000, 5000, (3, 4)).astype(np.float32)} for _ in range(4)]
    start = {"w": torch.randn(3, 4)}

    straight = momentum_steps(dict(start), {}, sums)
    velocity: dict[str, torch.Tensor] = {}
    halfway = momentum_steps(dict(start), velocity, sums[:2])
    save_checkpoint(
        tmp_path,
        2,
        {k: v.numpy() for k, v in halfway.items()},
        server_state={k: v.numpy() for k, v in velocity.items()},
    )
    checkpoint = load_latest_checkpoint(tmp_path)
    assert checkpoint is not None and set(checkpoint.weights) == {"w"}
    resumed = momentum_steps(
        {k: torch.from_numpy(v) for k, v in checkpoint.weights.items()},
        {k: torch.from_numpy(v) for k, v in checkpoint.server_state.items()},
        sums[2:],
    )
    assert torch.allclose(resumed["w"], straight["w"], atol=1e-6)
    restarted = momentum_steps(dict(halfway), {}, sums[2:])  # what losing the velocity would give
    assert not torch.allclose(restarted["w"], straight["w"], atol=1e-3)


def test_no_velocity_is_kept_without_momentum() -> None:
    velocity: dict[str, torch.Tensor] = {}
    noisy_gradient_step(
        {"w": torch.zeros(2)},
        {"w": np.ones(2)},
        total_records=10,
        plan=PLAN,
        learning_rate=0.1,
        velocity=velocity,
    )
    assert velocity == {}
