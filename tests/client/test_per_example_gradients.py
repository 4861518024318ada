"""The one-backward per-example gradients equal the reference ones.

References: a loop of single-example backward passes (plain autograd, one example at a time)
and Opacus' ``GradSampleModule`` (hooks mode) with ``DPOptimizer.clip_and_accumulate``. For
every image encoder and activation, ``PerExampleGradients`` gives each example's gradient
(as the weighted sum with a one-hot weight), its norm and the clipped sum, in float32 and
float64. The batches repeat token ids within an example (a caption's words recur in its
distractors; position ids repeat over the candidates), so an embedding's per-example rows
must be merged before their norm is taken.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedmm.client.per_example_gradients import PerExampleGradients, clip_factors
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ACTIVATIONS, IMAGE_ENCODERS, ModelConfig
from fedmm.common.tokenizer import PAD_ID

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CONFIG = ModelConfig(width=16, heads=2, vocab_buckets=64)
VARIANTS = tuple(itertools.product(IMAGE_ENCODERS, ACTIVATIONS))
VARIANT_IDS = ["-".join(variant) for variant in VARIANTS]
BATCH, CANDIDATES = 5, 3
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 28, 56)`` uint8 and candidates ``(B, C, T)`` with padding; 64 buckets,
    so ids repeat within an example."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 28, 56), generator=generator).to(torch.uint8)
    tokens = torch.randint(
        1, CONFIG.vocab_buckets, (BATCH, CANDIDATES, CONFIG.max_len), generator=generator
    )
    lengths = torch.randint(2, CONFIG.max_len + 1, (BATCH, CANDIDATES), generator=generator)
    tokens[torch.arange(CONFIG.max_len) >= lengths[..., None]] = PAD_ID
    return images, tokens


def _model(encoder: str, activation: str) -> CrossAttentionMatcher:
    torch.manual_seed(0)
    return CrossAttentionMatcher(replace(CONFIG, image_encoder=encoder, activation=activation))


def _one_at_a_time(
    model: nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """The reference: each example's gradient from its own backward pass."""
    grads = []
    for i in range(len(images)):
        model.zero_grad(set_to_none=True)
        matching_loss(model(images[i : i + 1], tokens[i : i + 1])).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return grads


def _flat_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()]).norm()


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name].double(), want[name].double(), rtol=RTOL, atol=ATOL, msg=name
        )


@pytest.mark.parametrize(("encoder", "activation"), VARIANTS, ids=VARIANT_IDS)
def test_each_examples_gradient_and_norm_equal_a_backward_pass_on_it_alone(
    encoder: str, activation: str
) -> None:
    model = _model(encoder, activation)
    reference = _one_at_a_time(copy.deepcopy(model), *_batch(1))
    images, tokens = _batch(1)
    with PerExampleGradients(model) as tape:
        tape.backward(matching_loss(model(images, tokens)))
        for dtype in (torch.float32, torch.float64):
            norms = tape.squared_norms(dtype).sqrt()
            assert norms.dtype == dtype
            want = torch.stack([_flat_norm(g) for g in reference]).to(dtype)
            torch.testing.assert_close(norms, want, rtol=RTOL, atol=ATOL)
            for i in range(BATCH):
                one_hot = torch.zeros(BATCH, dtype=dtype)
                one_hot[i] = 1.0
                _assert_close(tape.weighted_sums(one_hot), reference[i])
    # The model's own gradients were not touched: only the per-example terms were computed.
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("encoder", "activation"), VARIANTS, ids=VARIANT_IDS)
def test_the_clipped_sum_equals_opacus_hooks_and_clip_and_accumulate(
    encoder: str, activation: str
) -> None:
    model = _model(encoder, activation)
    wrapped = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    images, tokens = _batch(2)
    with PerExampleGradients(copy.deepcopy(model)) as probe:
        probe.backward(matching_loss(probe.model(images, tokens)))
        clip = float(probe.squared_norms().sqrt().median())  # clips some examples, not all
    optimizer = DPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=BATCH,
        loss_reduction="sum",
    )
    matching_loss(wrapped(images, tokens)).sum().backward()
    optimizer.clip_and_accumulate()
    opacus_sum = {name: p.summed_grad for name, p in wrapped._module.named_parameters()}
    wrapped._close()

    with PerExampleGradients(model) as tape:
        tape.backward(matching_loss(model(images, tokens)))
        norms = tape.squared_norms().sqrt()
        assert bool((norms > clip * 1.01).any() and (norms < clip / 1.01).any())
        _assert_close(tape.weighted_sums(clip_factors(norms, clip)), opacus_sum)


def test_repeated_ids_are_merged_before_the_norm() -> None:
    """Control: adding the squared norms of an embedding's rows without merging the rows of
    a repeated id gives another norm, and the test batch has such ids."""
    model = _model("patches", "gelu")
    images, tokens = _batch(1)
    assert any(len(torch.unique(t)) < t.numel() for t in tokens)
    with PerExampleGradients(model) as tape:
        tape.backward(matching_loss(model(images, tokens)))
        merged = tape.squared_norms(torch.float64)
        embedding = next(t for t in tape._terms if getattr(t, "layer", None) is model.token_embed)
        unmerged_rows = embedding.grad.double().square().sum((1, 2))
        merged_rows = embedding.squared_norms(BATCH, torch.float64)
    assert not torch.allclose(merged_rows, unmerged_rows, rtol=1e-3)
    assert bool((merged > 0).all())


def test_unsupported_and_shared_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="BatchNorm1d"):
        PerExampleGradients(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    layer = nn.Linear(3, 3)
    with (
        PerExampleGradients(nn.Sequential(layer, layer)) as tape,
        pytest.raises(ValueError, match="twice"),
    ):
        tape.model(torch.ones(2, 3))


def test_hooks_are_removed_on_exit() -> None:
    model = _model("patches", "gelu")
    images, tokens = _batch(1)
    with PerExampleGradients(model) as tape:
        pass
    model(images, tokens)
    assert tape._calls == []
    assert all(not m._forward_hooks for m in model.modules())


class _FlattenedCandidates(nn.Module):
    """A Linear on an item's candidates flattened into the batch dimension, then summed per
    example: its rows ``(B * C, D)`` are grouped back by example for the gradients."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, D)
        out = self.layer(x.reshape(-1, *x.shape[2:]))
        return out.reshape(x.shape[0], -1).square().sum(1)


def test_rows_of_flattened_candidates_are_grouped_by_example() -> None:
    torch.manual_seed(0)
    model = _FlattenedCandidates(nn.Linear(4, 3)).double()
    x = torch.randn(BATCH, CANDIDATES, 4, dtype=torch.float64)
    with PerExampleGradients(model) as tape:
        tape.backward(model(x))
        norms = tape.squared_norms(torch.float64).sqrt()
    for i in range(BATCH):
        model.zero_grad(set_to_none=True)
        model(x[i : i + 1]).sum().backward()
        flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(norms[i], flat.norm())
    conv = _FlattenedCandidates(nn.Conv2d(1, 2, 1))
    with PerExampleGradients(conv) as tape, pytest.raises(ValueError, match="Linear and LayerNorm"):
        tape.backward(conv(torch.randn(BATCH, CANDIDATES, 1, 2, 2)))
