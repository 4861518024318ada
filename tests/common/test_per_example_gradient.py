"""DP-SGD needs each example's gradient to depend on that example alone.

Checked with Opacus itself (``GradSampleModule``, hooks mode: the reference that
``client.per_example_gradients`` is tested against) on a small ``CrossAttentionMatcher`` and
the training loss ``matching_loss``: changing other examples of the batch leaves an
example's per-sample gradient unchanged, changing the example changes it, and Opacus'
per-sample gradient equals the plain autograd gradient of the model run on that example alone
(so no layer mixes the batch and Opacus computes per-sample gradients for every parameter).
The three image encoders (patches, conv, scatter) are checked on the benchmark's 28x56
grayscale canvas, the conv and scatter models with tanh activations, and each encoder on RGB
images of other sizes.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.utils import get_gsm_class
from opacus.validators import ModuleValidator
from torch import nn

from fedmm.common.data.caption_bank import CaptionBank
from fedmm.common.distractors import DistractorSampler, DistractorSettings
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import PAD_ID, HashingTokenizer

# Opacus' full backward hooks fire on module outputs here (inputs are integer ids/pixels).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CONFIG = ModelConfig(width=16, heads=2)
ENCODERS = ("patches", "conv", "scatter")
#: The models whose per-sample gradients are checked, by name
VARIANTS = {
    "patches-gelu": CONFIG,
    "conv-gelu": replace(CONFIG, image_encoder="conv"),
    "conv-tanh": replace(CONFIG, image_encoder="conv", activation="tanh"),
    "scatter-tanh": replace(CONFIG, image_encoder="scatter", activation="tanh"),
    "patches-rgb-32x32": replace(
        CONFIG, image_height=32, image_width=32, image_channels=3, patch_size=8
    ),
    "conv-rgb-40x24": replace(
        CONFIG, image_encoder="conv", image_height=40, image_width=24, image_channels=3
    ),
    "scatter-rgb-32x32": replace(
        CONFIG, image_encoder="scatter", image_height=32, image_width=32, image_channels=3
    ),
}
BATCH, CANDIDATES = 4, 3
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster, and much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _example(
    generator: torch.Generator, config: ModelConfig = CONFIG
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (``(28, 56)`` uint8 for the default config) and its candidates ``(C, T)``
    with some padding."""
    image = torch.randint(0, 256, config.record_image_shape, generator=generator)
    tokens = torch.randint(
        1, CONFIG.vocab_buckets, (CANDIDATES, CONFIG.max_len), generator=generator
    )
    lengths = torch.randint(2, CONFIG.max_len + 1, (CANDIDATES,), generator=generator)
    tokens[torch.arange(CONFIG.max_len) >= lengths[:, None]] = PAD_ID
    return image.to(torch.uint8), tokens


def _batch(seed: int, config: ModelConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    examples = [_example(generator, config) for _ in range(BATCH)]
    return torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request) -> tuple[GradSampleModule, CrossAttentionMatcher]:
    """Opacus' wrapper around one model, and an unwrapped copy with the same weights."""
    torch.manual_seed(0)
    model = CrossAttentionMatcher(VARIANTS[request.param])
    plain = copy.deepcopy(model)
    gsm_class = get_gsm_class("hooks")  # what make_private(grad_sample_mode="hooks") uses
    assert gsm_class is GradSampleModule
    wrapped = gsm_class(model, batch_first=True, loss_reduction="sum", force_functorch=False)
    yield wrapped, plain
    wrapped._close()


def _per_sample_grads(
    wrapped: GradSampleModule, images: torch.Tensor, tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    wrapped.zero_grad(set_to_none=True)
    matching_loss(wrapped(images, tokens)).sum().backward()
    grads = {}
    for name, p in wrapped._module.named_parameters():
        assert p.grad_sample is not None, f"Opacus computed no per-sample gradient for {name}"
        assert p.grad_sample.shape == (len(images), *p.shape), name
        grads[name] = p.grad_sample.detach().clone()
    return grads


def _row(grads: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {name: g[i] for name, g in grads.items()}


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_model_passes_opacus_validation_strictly(encoder: str) -> None:
    model = CrossAttentionMatcher(replace(CONFIG, image_encoder=encoder))
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)  # raises on any unsupported module
    # The validator is not vacuous: it flags BatchNorm, which mixes examples.
    assert ModuleValidator.validate(nn.Sequential(nn.BatchNorm1d(4)), strict=False)


@pytest.mark.parametrize(
    ("encoder", "layer_types"),
    [
        ("patches", {nn.Linear, nn.LayerNorm, nn.Embedding}),
        ("conv", {nn.Linear, nn.LayerNorm, nn.Embedding, nn.Conv2d, nn.GroupNorm}),
        ("scatter", {nn.Linear, nn.LayerNorm, nn.Embedding, nn.Conv2d, nn.GroupNorm}),
    ],
)
def test_every_trainable_layer_has_an_opacus_hook_sampler(encoder: str, layer_types) -> None:
    """No functorch fallback: each module owning parameters is a type Opacus' hooks know."""
    model = CrossAttentionMatcher(replace(CONFIG, image_encoder=encoder))
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners == layer_types
    assert owners <= set(GradSampleModule.GRAD_SAMPLERS)


def test_other_examples_do_not_change_an_examples_gradient(models) -> None:
    wrapped, plain = models
    images, tokens = _batch(seed=1, config=plain.config)
    before = _row(_per_sample_grads(wrapped, images, tokens), 0)
    assert _max_abs_diff(before, {k: torch.zeros_like(v) for k, v in before.items()}) > 1e-4

    other_images, other_tokens = _batch(seed=2, config=plain.config)
    changed_images, changed_tokens = images.clone(), tokens.clone()
    changed_images[1:], changed_tokens[1:] = other_images[1:], other_tokens[1:]
    _assert_close(_row(_per_sample_grads(wrapped, changed_images, changed_tokens), 0), before)

    # Only example 1 replaced (image and captions): example 0 still unchanged.
    one_changed_images, one_changed_tokens = images.clone(), tokens.clone()
    one_changed_images[1], one_changed_tokens[1] = other_images[1], other_tokens[1]
    _assert_close(
        _row(_per_sample_grads(wrapped, one_changed_images, one_changed_tokens), 0), before
    )


def test_changing_the_example_itself_changes_its_gradient(models) -> None:
    wrapped, plain = models
    images, tokens = _batch(seed=1, config=plain.config)
    before = _row(_per_sample_grads(wrapped, images, tokens), 0)
    other_images, other_tokens = _batch(seed=2, config=plain.config)

    image_changed = images.clone()
    image_changed[0] = other_images[0]
    after_image = _row(_per_sample_grads(wrapped, image_changed, tokens), 0)
    assert _max_abs_diff(after_image, before) > 1e-4

    tokens_changed = tokens.clone()
    tokens_changed[0] = other_tokens[0]
    after_tokens = _row(_per_sample_grads(wrapped, images, tokens_changed), 0)
    assert _max_abs_diff(after_tokens, before) > 1e-4


def test_opacus_per_sample_gradient_equals_gradient_on_the_example_alone(models) -> None:
    wrapped, plain = models
    images, tokens = _batch(seed=3, config=plain.config)
    per_sample = _per_sample_grads(wrapped, images, tokens)
    for i in range(BATCH):
        plain.zero_grad(set_to_none=True)
        matching_loss(plain(images[i : i + 1], tokens[i : i + 1])).sum().backward()
        alone = {name: p.grad for name, p in plain.named_parameters()}
        assert all(g is not None for g in alone.values())
        _assert_close(_row(per_sample, i), alone)


def test_the_check_detects_a_loss_that_uses_other_records(models) -> None:
    """Control: negatives taken from another record of the batch (as in-batch contrastive
    losses do) make example 0's gradient depend on example 1, and the check sees it."""
    wrapped, plain = models
    images, tokens = _batch(seed=1, config=plain.config)

    def with_neighbour_negative(tok: torch.Tensor) -> torch.Tensor:
        return torch.cat([tok, tok.roll(-1, dims=0)[:, :1]], dim=1)  # + next record's caption

    before = _row(_per_sample_grads(wrapped, images, with_neighbour_negative(tokens)), 0)
    _, other_tokens = _batch(seed=2, config=plain.config)
    changed_tokens = tokens.clone()
    changed_tokens[1] = other_tokens[1]
    after = _row(_per_sample_grads(wrapped, images, with_neighbour_negative(changed_tokens)), 0)
    assert _max_abs_diff(after, before) > 1e-4


BANK = CaptionBank.from_bytes(
    "\n".join(
        [
            "a red apple on a table",
            "stick man waving",
            "flag of brazil",
            "a playing card, the nine of hearts",
            "computer icon of a printer",
            "a small sailing boat",
            "road sign: stop",
            "a smiling sun",
        ]
    ).encode(),
    source="test bank",
)


def _bank_candidates(
    captions: list[str], config: ModelConfig, *, seed: int
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Candidates of each caption from word swaps and the bank, each example drawing from
    its own random stream (as one record's draws depend on its own caption only)."""
    sampler = DistractorSampler(
        DistractorSettings(word_lists=("colours", "positions"), bank=BANK),
        tokenizer=HashingTokenizer.for_model(config),
        num_distractors=CANDIDATES - 1,
    )
    rows = [
        sampler.candidate_tokens(c, np.random.default_rng([seed, i]))
        for i, c in enumerate(captions)
    ]
    return torch.from_numpy(np.stack(rows)), rows


def test_bank_distractors_keep_each_examples_gradient_its_own(models) -> None:
    """The caption bank extends the loss without mixing records: replacing example 1 (its
    image and caption) changes neither example 0's candidates nor its gradient."""
    wrapped, plain = models
    images, _ = _batch(seed=4, config=plain.config)
    captions = [
        "left lower lobe consolidation",
        "a red apple on the left",
        "Chinese flag (correct)",
        "stick man",
    ]
    tokens, rows = _bank_candidates(captions, plain.config, seed=7)
    before = _row(_per_sample_grads(wrapped, images, tokens), 0)

    other_images, _ = _batch(seed=5, config=plain.config)
    changed_images = images.clone()
    changed_images[1] = other_images[1]
    changed = [captions[0], "a blue boat below a smiling sun", *captions[2:]]
    changed_tokens, changed_rows = _bank_candidates(changed, plain.config, seed=7)
    assert np.array_equal(changed_rows[0], rows[0])
    assert not np.array_equal(changed_rows[1], rows[1])
    _assert_close(_row(_per_sample_grads(wrapped, changed_images, changed_tokens), 0), before)
    # and the change did reach example 1's own gradient
    after_one = _row(_per_sample_grads(wrapped, changed_images, changed_tokens), 1)
    assert _max_abs_diff(after_one, _row(_per_sample_grads(wrapped, images, tokens), 1)) > 1e-4
