"""LoRA adapters (``peft``) on the last blocks of pretrained encoders, trained with the
fusion head.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) adds
``(alpha / r) B A x`` to a frozen linear layer ``W x``, with ``A`` (``r x in``) and ``B``
(``out x r``, zero at the start) trained. ``peft`` (``inject_adapter_in_model``) puts them on
the layers :mod:`common.pretrained.encoder_blocks` names, in copies of the encoder's last
``model-lora-blocks`` blocks (:class:`EncoderTail`): ``A`` and ``B`` are two ``nn.Linear``,
whose per-example gradients DP-SGD computes exactly like the head's
(``client.per_example_gradients``; Yu et al., "Differentially Private Fine-tuning of
Language Models", ICLR 2022, train LoRA under DP-SGD the same way).

:class:`AdaptedFusionMatcher` is the trained model then: the tails run on the cached hidden
states entering the adapted blocks, the fusion head on their output. Its ``state_dict`` holds
the trained tensors only, the head and the adapters' ``A`` and ``B``: that is what travels in
messages and SecAgg+ vectors and what checkpoints and ``model.safetensors`` hold. The copied
frozen weights come from the site's own encoders, pinned by SHA-256 like the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedmm.common.model import ImageStates, TextStates
from fedmm.common.model_config import ModelConfig
from fedmm.common.pretrained.encoder_blocks import BlockLayout, EncoderTail, adapted_layouts
from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher

if TYPE_CHECKING:
    from fedmm.common.pretrained.frozen_encoders import FrozenEncoders

#: The prefix of every adapter tensor's name (``peft``'s).
ADAPTER_MARK = "lora_"


def adapted_tail(layout: BlockLayout, *, blocks: int, rank: int, alpha: float) -> EncoderTail:
    """A copy of ``layout``'s last ``blocks`` blocks with LoRA adapters of ``rank`` on their
    target layers; only the adapters are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    tail = EncoderTail(layout, blocks)
    targets = [f"blocks.{i}.{name}" for i in range(blocks) for name in layout.targets]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    inject_adapter_in_model(config, tail)
    for name, parameter in tail.named_parameters():
        parameter.requires_grad_(ADAPTER_MARK in name)
    if not any(p.requires_grad for p in tail.parameters()):
        raise RuntimeError(f"peft put no adapters on {targets}")
    return tail


class AdaptedFusionMatcher(FeatureFusionMatcher):
    """The fusion head over encoder tails with LoRA adapters (module docstring). Inputs are
    the cached hidden states entering each adapted encoder's first adapted block (a frozen
    side's features as before)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        image_tail: EncoderTail | None,
        text_tail: EncoderTail | None,
    ) -> None:
        super().__init__(config)
        self.image_tail = image_tail
        self.text_tail = text_tail
        self.frozen_names = frozenset(
            name
            for name, tensor in [*self.named_parameters(), *self.named_buffers()]
            if name.startswith(("image_tail.", "text_tail."))
            and not (isinstance(tensor, nn.Parameter) and tensor.requires_grad)
        )
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_frozen_are_not_missing)

    def encode_images(self, features: torch.Tensor) -> ImageStates:
        """``features``: the hidden states entering the image encoder's first adapted block
        ``(N, P', D)`` (or its frozen tokens when it has no adapters)."""
        if self.image_tail is not None:
            features = self.image_tail(features.to(_dtype(self.image_tail)))
        return super().encode_images(features)

    def encode_texts(self, features: torch.Tensor, valid: torch.Tensor) -> TextStates:
        """``features``: the hidden states ``(..., T, D)`` entering the text encoder's first
        adapted block, ``valid`` ``(..., T)``. The leading dimensions are flattened for the
        blocks, an example's rows staying together (per-example gradients rely on it)."""
        if self.text_tail is not None:
            length, width = features.shape[-2:]
            flat = self.text_tail(
                features.reshape(-1, length, width).to(_dtype(self.text_tail)),
                valid.reshape(-1, length),
            )
            features = flat.reshape(*features.shape[:-2], length, flat.shape[-1])
        return super().encode_texts(features, valid)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _drop_frozen(
    module: AdaptedFusionMatcher, state: dict[str, Any], prefix: str, _metadata: Any
) -> None:
    for name in module.frozen_names:
        state.pop(prefix + name, None)


def _frozen_are_not_missing(module: AdaptedFusionMatcher, incompatible: Any) -> None:
    frozen = module.frozen_names
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


def build_fusion_model(
    config: ModelConfig, encoders: FrozenEncoders | None
) -> FeatureFusionMatcher:
    """The trained model of a pretrained run: the fusion head alone (frozen encoders:
    ``model-lora-blocks`` = 0), else the head with adapted copies of the encoders' last
    blocks (``encoders`` needed)."""
    if not config.lora_blocks:
        return FeatureFusionMatcher(config)
    if encoders is None:
        raise ValueError("a model with LoRA adapters needs its frozen encoders to build")
    image, text = adapted_layouts(config, encoders)
    tails = [
        None
        if layout is None
        else adapted_tail(layout, blocks=blocks, rank=config.lora_rank, alpha=config.lora_alpha)
        for layout, blocks in ((image, config.image_lora_blocks), (text, config.text_lora_blocks))
    ]
    return AdaptedFusionMatcher(config, image_tail=tails[0], text_tail=tails[1])
