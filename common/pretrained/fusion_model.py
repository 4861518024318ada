"""The trained part over frozen pretrained encoders: projection heads and cross-attention.

Inputs are the frozen encoders' features (``common.pretrained.frozen_encoders``), computed
once per record and cached at the site: image tokens ``(N, P, D_image)`` and caption token
states ``(..., T, D_text)`` with their validity. Each side is normalised (LayerNorm: the
encoders' feature scales differ), projected to the model width and refined by one residual
feed-forward layer (the projection heads); then, as in ``common.model``, every caption
token queries the image's tokens (the cross-attention fusion: its score is its readout
vector dotted with the values it attended to, a caption's score the mean over its tokens).

Only this module's parameters are trained, sent and summed: the frozen encoders are not part
of it, so the global model in every message and every SecAgg+ vector is the head alone
(with LoRA adapters on the encoders' last blocks, the head and the adapters:
``common.pretrained.lora_adapters``). Its
layers are ``nn.Linear`` and ``nn.LayerNorm``, whose per-example gradients the site's
DP-SGD computes exactly (``client.per_example_gradients``). Training on cached features
with the frozen encoders fixed is the "linear probing / fine-tuning the last layers on
pretrained features" regime in which DP-SGD keeps the most accuracy (Tramer and Boneh,
ICLR 2021; De, Berrada, Hayes, Smith, Balle, 2022).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmm.common.model import (
    CrossAttentionMatcher,
    FeedForward,
    ImageStates,
    TextStates,
    score_all_pairs,
    score_candidates,
)
from fedmm.common.model_config import ModelConfig


class ProjectionHead(nn.Module):
    """Frozen features ``(..., D)`` to the model width: LayerNorm without its own scale and
    shift (the Linear after it has both: the same functions, and no per-example gradients
    over the D-wide features), Linear, a residual feed-forward layer, LayerNorm."""

    def __init__(self, features: int, width: int, mlp_ratio: int, activation: str) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(features, elementwise_affine=False)
        self.project = nn.Linear(features, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio, activation)
        self.output_norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.input_norm(x))
        x = x + self.mlp(self.mlp_norm(x))
        return self.output_norm(x)


class FeatureFusionMatcher(nn.Module):
    """Scores how well a caption describes an image, from frozen features (higher is
    better)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.pretrained or not config.image_feature_dim or not config.text_feature_dim:
            raise ValueError(
                "the fusion head needs a model config resolved against its frozen encoders "
                "(common.pretrained.frozen_encoders.resolve_model_config)"
            )
        self.config = config
        w = config.width
        self.image_head = ProjectionHead(
            config.image_feature_dim, w, config.mlp_ratio, config.activation
        )
        self.text_head = ProjectionHead(
            config.text_feature_dim, w, config.mlp_ratio, config.activation
        )
        self.cross_query = nn.Linear(w, w)
        self.cross_readout = nn.Linear(w, w)
        self.cross_key = nn.Linear(w, w)
        self.cross_value = nn.Linear(w, w)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.config.heads, -1))

    def encode_images(self, features: torch.Tensor) -> ImageStates:
        """``features``: image tokens ``(N, P, D_image)``."""
        if features.dim() != 3 or features.shape[-1] != self.config.image_feature_dim:
            raise ValueError(
                f"image features of shape {tuple(features.shape)} do not fit this head, "
                f"which takes (N, P, {self.config.image_feature_dim})"
            )
        x = self.image_head(features.to(self.image_head.project.weight.dtype))
        return ImageStates(self._heads(self.cross_key(x)), self._heads(self.cross_value(x)))

    def encode_texts(self, features: torch.Tensor, valid: torch.Tensor) -> TextStates:
        """``features``: caption token states ``(..., T, D_text)``; ``valid``: ``(..., T)``."""
        if features.shape[-1] != self.config.text_feature_dim:
            raise ValueError(
                f"text features of shape {tuple(features.shape)} do not fit this head, "
                f"which takes (..., T, {self.config.text_feature_dim})"
            )
        valid = valid.clone()
        valid[..., 0] = True  # an empty caption still has one position to attend from
        x = self.text_head(features.to(self.text_head.project.weight.dtype))
        return TextStates(
            self._heads(self.cross_query(x)), self._heads(self.cross_readout(x)), valid
        )

    def score_candidates(self, images: ImageStates, texts: TextStates) -> torch.Tensor:
        return score_candidates(images, texts)

    def score_all_pairs(
        self, images: ImageStates, texts: TextStates, chunk: int = 25
    ) -> torch.Tensor:
        return score_all_pairs(images, texts, chunk)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``(B, C)`` for image tokens ``(B, P, D_image)`` and candidate captions'
        token states ``(B, C, T, D_text)`` with validity ``(B, C, T)``."""
        return score_candidates(
            self.encode_images(image_features), self.encode_texts(text_features, valid)
        )


def build_matcher(config: ModelConfig) -> CrossAttentionMatcher | FeatureFusionMatcher:
    """The model a config names: the fusion head for pretrained encoders (resolved config),
    the built-in matcher otherwise."""
    return FeatureFusionMatcher(config) if config.pretrained else CrossAttentionMatcher(config)
