"""DP-SGD with one-backward clipped sums is the DP-SGD that Opacus' hooks ran before.

``client.secure_dp_sgd.train_dp_sgd`` against the previous loop, kept here as the reference:
Opacus' ``GradSampleModule`` (hooks mode) and ``DPOptimizer`` (``clip_and_accumulate``),
with the same CSPRNG noise and Poisson batches. From the same AES-CTR key both runs draw the
same batches and the same noise (the keystreams end at the same position), take the same
steps (the accountant's history is equal) and end at the same weights: privacy is unchanged
(same clipping, noise, sampling and accounting); only the speed differs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from fedmm.client.secure_dp_sgd import SecureNoiseDPOptimizer, poisson_batch, train_dp_sgd
from fedmm.client.training import MatchingDataset
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import IMAGE_ENCODERS, ModelConfig
from fedmm.common.secure_random import aes_ctr_random_bytes
from fedmm.common.tokenizer import HashingTokenizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
]

CONFIG = ModelConfig(width=16, heads=2)
SIGMA, CLIP, LR = 0.7, 0.5, 0.5


class _HooksOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (clips ``p.grad_sample``) with the site's CSPRNG noise."""

    add_noise = SecureNoiseDPOptimizer.add_noise


def _reference_train(model, dataset, *, rate: float, steps: int, expected: float, stream):
    """The loop ``train_dp_sgd`` ran with Opacus' hooks: returns the accountant's history."""
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    private = _HooksOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=expected,  # type: ignore[arg-type]
        loss_reduction="mean",
    )
    private.random_bytes = stream
    accountant = RDPAccountant()
    private.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
    wrapped.train()
    for _ in range(steps):
        images, tokens = poisson_batch(dataset, sample_rate=rate, random_bytes=stream)
        private.zero_grad(set_to_none=True)
        losses = matching_loss(wrapped(images, tokens))
        (losses.sum() if len(images) == 0 else losses.mean()).backward()
        private.step()
    wrapped._close()
    return accountant.history


@pytest.mark.parametrize(
    ("encoder", "records", "rate", "steps"),
    [(encoder, 24, 0.25, 4) for encoder in IMAGE_ENCODERS] + [("patches", 10, 0.1, 6)],
    ids=[*IMAGE_ENCODERS, "patches-empty-batches"],
)
def test_same_key_same_batches_noise_steps_and_weights(
    encoder: str, records: int, rate: float, steps: int
) -> None:
    torch.set_num_threads(1)
    data = benchmark_train_records().subset(np.arange(records))
    config = replace(CONFIG, image_encoder=encoder, activation="tanh")
    torch.manual_seed(0)
    initial = CrossAttentionMatcher(config).state_dict()
    expected = rate * records
    runs = []
    for train in ("one-backward", "hooks"):
        model = CrossAttentionMatcher(config)
        model.load_state_dict(initial)
        dataset = MatchingDataset(data, tokenizer=HashingTokenizer(), num_distractors=2, seed=3)
        stream = aes_ctr_random_bytes(bytes([9]) * 32)
        if train == "hooks":
            history = _reference_train(
                model, dataset, rate=rate, steps=steps, expected=expected, stream=stream
            )
        else:
            _, history = train_dp_sgd(
                model,
                dataset,
                optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                noise_multiplier=SIGMA,
                max_grad_norm=CLIP,
                sample_rate=rate,
                steps=steps,
                expected_batch_size=expected,
                accountant_history=[],
                random_bytes=stream,
            )
        runs.append((model.state_dict(), history, stream(32)))
    (fast, fast_history, fast_next), (hooks, hooks_history, hooks_next) = runs
    assert fast_history == hooks_history == [(SIGMA, rate, steps)]
    assert fast_next == hooks_next  # the same bytes were drawn: same batches, same noise
    moved = max(float((hooks[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 0.05  # the weights moved: the comparison below is not vacuous
    for key in initial:
        torch.testing.assert_close(fast[key], hooks[key], rtol=1e-4, atol=1e-5, msg=key)
