"""The model's attention computes standard multi-head attention (image and text blocks).

Regression test: the image blocks used Opacus 1.6's ``DPMultiheadAttention`` with
``batch_first=True``, whose output reshape splices heads into positions whenever heads > 1
(meta-pytorch/opacus PR #825). Reference here: ``torch.nn.MultiheadAttention`` with the same
weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmm.common.model import CrossAttentionMatcher, MultiHeadAttention
from fedmm.common.model_config import ModelConfig


def _reference(attn: MultiHeadAttention, width: int, heads: int) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        ref.out_proj.weight.copy_(attn.out.weight)
        ref.out_proj.bias.copy_(attn.out.bias)
    return ref.eval()


def test_image_block_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    config = ModelConfig(width=16, heads=4)
    attn = CrossAttentionMatcher(config).image_blocks[0].attn
    assert isinstance(attn, MultiHeadAttention)
    x = torch.randn(3, config.num_patches, config.width)
    expected = _reference(attn, config.width, config.heads)(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(attn(x, None), expected, rtol=1e-5, atol=1e-6)


def test_text_attention_with_padding_matches_torch_multihead_attention() -> None:
    torch.manual_seed(1)
    config = ModelConfig(width=16, heads=2)
    attn = CrossAttentionMatcher(config).text_blocks[0].attn
    x = torch.randn(2, 5, config.width)
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    expected = _reference(attn, config.width, config.heads)(
        x, x, x, key_padding_mask=padding, need_weights=False
    )[0]
    torch.testing.assert_close(attn(x, padding), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["patches", "conv", "scatter"])
def test_model_scores_an_empty_batch(encoder: str) -> None:
    """Poisson sampling draws empty batches; DP training runs the model on them."""
    model = CrossAttentionMatcher(ModelConfig(width=16, heads=2, image_encoder=encoder))
    scores = model(torch.zeros(0, 28, 56, dtype=torch.uint8), torch.ones(0, 3, 12).long())
    assert scores.shape == (0, 3)


@pytest.mark.parametrize(("encoder", "tokens"), [("patches", 32), ("conv", 28), ("scatter", 28)])
def test_image_encoders_give_one_key_per_image_token(encoder: str, tokens: int) -> None:
    config = ModelConfig(width=16, heads=2, image_encoder=encoder)
    assert config.num_image_tokens == tokens
    states = CrossAttentionMatcher(config).encode_images(torch.zeros(3, 28, 56))
    assert states.keys.shape == (3, tokens, 2, 8) == states.values.shape


def test_unknown_image_encoder_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="image_encoder must be one of"):
        ModelConfig(image_encoder="resnet")


def test_unknown_activation_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'tanh'\)"):
        ModelConfig(activation="relu")


def test_tanh_replaces_gelu_in_the_conv_stem_and_feed_forward_layers() -> None:
    """Same weights (the activation has none, so a checkpoint loads into either model);
    with tanh, every hidden activation of the conv stem and the feed-forward layers is tanh."""
    torch.manual_seed(0)
    gelu = CrossAttentionMatcher(ModelConfig(width=16, heads=2, image_encoder="conv"))
    tanh = CrossAttentionMatcher(
        ModelConfig(width=16, heads=2, image_encoder="conv", activation="tanh")
    )
    tanh.load_state_dict(gelu.state_dict())  # strict: the same parameter names and shapes
    kinds = {type(m) for m in tanh.modules() if isinstance(m, (nn.GELU, nn.Tanh))}
    assert kinds == {nn.Tanh}
    assert sum(isinstance(m, nn.Tanh) for m in tanh.modules()) == 4 + 2  # stem + 2 blocks
    images = torch.randint(0, 256, (2, 28, 56), dtype=torch.uint8)
    tokens = torch.randint(1, 50, (2, 3, 12))
    assert not torch.allclose(gelu(images, tokens), tanh(images, tokens))
