"""The coordinator's step on the revealed sum is torch's SGD on gamma * S / (q N)."""

from __future__ import annotations

import numpy as np
import torch

from common.distributed_dp.plan import DistributedDPPlan
from server.distributed_dp import noisy_gradient_step

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


def test_step_matches_torch_sgd_with_momentum() -> None:
    rng = np.random.default_rng(1)
    weights = {"w": torch.randn(3, 4, dtype=torch.float64)}
    parameter = torch.nn.Parameter(weights["w"].clone())
    optimizer = torch.optim.SGD([parameter], lr=0.5, momentum=0.9)
    velocity: dict[str, torch.Tensor] = {}
    for _ in range(3):
        summed = {"w": rng.integers(-5000, 5000, (3, 4)).astype(np.float64)}
        weights = noisy_gradient_step(
            weights,
            summed,
            total_records=2000,
            plan=PLAN,
            learning_rate=0.5,
            momentum=0.9,
            velocity=velocity,
        )
        parameter.grad = torch.from_numpy(summed["w"] * PLAN.scale / (0.1 * 2000))
        optimizer.step()
    assert torch.allclose(weights["w"], parameter.detach(), atol=1e-12)
