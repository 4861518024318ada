"""The scattering features (``common.scattering``) and the model's scatter encoder."""

from __future__ import annotations

import pytest
import torch

from fedmm.common import scattering
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.scattering import CHANNELS, scattering_features


@pytest.fixture(autouse=True)
def empty_memo():
    scattering._memo.clear()
    yield
    scattering._memo.clear()


def _canvases(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 28, 56, generator=torch.Generator().manual_seed(seed))


def test_features_have_81_channels_on_a_grid_four_times_coarser() -> None:
    assert CHANNELS == 81
    assert scattering_features(_canvases(3, 0)).shape == (3, 81, 7, 14)
    assert scattering_features(torch.zeros(0, 28, 56)).shape == (0, 81, 7, 14)


def test_a_constant_canvas_keeps_its_mean_in_order_zero_and_nothing_in_higher_orders() -> None:
    """Order 0 is a low-pass average; wavelets have zero mean, so a flat canvas has no
    first- or second-order energy."""
    features = scattering_features(torch.full((1, 28, 56), 0.7))
    torch.testing.assert_close(features[0, 0], torch.full((7, 14), 0.7), atol=1e-4, rtol=0)
    assert float(features[0, 1:].abs().max()) < 1e-4


def test_an_edge_puts_energy_in_the_wavelet_channels() -> None:
    canvas = torch.zeros(1, 28, 56)
    canvas[:, :, 28:] = 1.0
    assert float(scattering_features(canvas)[0, 1:17].abs().max()) > 0.05


def test_memoised_features_equal_a_fresh_transform_and_ignore_the_rest_of_the_batch() -> None:
    batch = _canvases(5, 1)
    first = scattering_features(batch)
    assert len(scattering._memo) == 5
    scattering._memo.clear()
    alone = torch.cat([scattering_features(batch[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(first, alone, rtol=1e-5, atol=1e-6)
    # From the memo now: the same values, in the order of the new batch.
    reordered = scattering_features(batch.flip(0))
    torch.testing.assert_close(reordered, alone.flip(0), rtol=0, atol=0)
    assert len(scattering._memo) == 5


def test_the_memo_is_keyed_by_content_not_by_position() -> None:
    batch = _canvases(2, 2)
    before = scattering_features(batch)
    changed = batch.clone()
    changed[1, 10, 20] += 0.5
    after = scattering_features(changed)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert float((after[1] - before[1]).abs().max()) > 1e-3


def test_the_memo_stays_within_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scattering, "MEMO_BYTES", 3 * CHANNELS * 7 * 14 * 4)  # 3 canvases
    batch = _canvases(5, 3)
    first = scattering_features(batch)
    assert len(scattering._memo) == 3
    torch.testing.assert_close(scattering_features(batch), first, rtol=0, atol=0)
    assert len(scattering._memo) <= 3


def test_bad_shapes_are_rejected_naming_the_requirement() -> None:
    with pytest.raises(ValueError, match=r"multiples of 4, got shape \(2, 30, 56\)"):
        scattering_features(torch.zeros(2, 30, 56))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(N, H, W\)"):
        scattering_features(torch.zeros(2, 1, 1, 28, 56))


def test_colour_images_get_81_channels_per_colour_channel() -> None:
    """Each colour channel is transformed alone: the features of an RGB image are those of
    its three planes, one after the other."""
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    features = scattering_features(images)
    assert features.shape == (2, 3 * CHANNELS, 4, 6)
    scattering._memo.clear()
    for channel in range(3):
        plane = scattering_features(images[:, channel])
        block = features[:, channel * CHANNELS : (channel + 1) * CHANNELS]
        torch.testing.assert_close(block, plane, rtol=1e-5, atol=1e-6)


def test_the_memo_tells_shapes_apart() -> None:
    """The same pixel bytes as a 28x56 canvas and as a 56x28 one are different images."""
    canvas = _canvases(1, 5)
    wide = scattering_features(canvas)
    tall = scattering_features(canvas.reshape(1, 56, 28))
    assert tall.shape == (1, CHANNELS, 14, 7) and wide.shape == (1, CHANNELS, 7, 14)
    scattering._memo.clear()
    torch.testing.assert_close(scattering_features(canvas.reshape(1, 56, 28)), tall)


def test_the_filter_bank_stays_out_of_the_model_state() -> None:
    """The filters are fixed: only the encoder's norms and convolution are state (and so
    travel in updates)."""
    model = CrossAttentionMatcher(ModelConfig(width=16, heads=2, image_encoder="scatter"))
    stem = {k for k in model.state_dict() if k.startswith("scatter_stem.")}
    assert stem == {f"scatter_stem.layers.{i}.{p}" for i in (0, 1, 2) for p in ("weight", "bias")}


def test_the_scatter_linear_encoder_is_one_linear_map_of_the_normalised_features() -> None:
    """Tramer and Boneh's "ScatterNet + linear": the image token is one affine map of all the
    GroupNorm'd scattering features, with nothing trained before it."""
    from dataclasses import replace

    from fedmm.common.model import CrossAttentionMatcher
    from fedmm.common.model_config import ModelConfig

    config = replace(ModelConfig(width=8, heads=2), image_encoder="scatter-linear")
    model = CrossAttentionMatcher(config)
    stem = model.scatter_stem
    assert [name for name, _ in stem.named_parameters()] == ["linear.weight", "linear.bias"]
    assert stem.linear.in_features == CHANNELS * 7 * 14
    assert config.num_image_tokens == 1
    images = _canvases(3, 6)
    tokens = stem(images[:, None])
    assert tokens.shape == (3, 1, 8)
    normalised = stem.norm(scattering_features(images)).flatten(1)
    torch.testing.assert_close(tokens[:, 0], normalised @ stem.linear.weight.T + stem.linear.bias)
