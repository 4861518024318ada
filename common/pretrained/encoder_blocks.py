"""The transformer blocks of a pretrained encoder, split where its adapted blocks start.

With LoRA adapters on an encoder's last ``N`` blocks (``common.pretrained.lora_adapters``)
everything before those blocks stays frozen, so a site computes, once per record, the hidden
states entering the first adapted block (:func:`block_input_encoder`: the encoder's own
forward pass, stopped there by a pre-hook) and caches them like frozen features; a round
runs only the adapted blocks and the encoder's finish (:class:`EncoderTail`) on them. The
split is exact: the tail of the block inputs is the encoder's own output
(``tests/common/test_encoder_blocks.py``).

Encoders with transformer blocks, and the layers of a block that get adapters (all
``nn.Linear``, whose per-example gradients DP-SGD computes exactly):

- ``timm`` ``VisionTransformer`` family: ``blocks.i``, then ``norm``; adapters on
  ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.
- ``open_clip`` vision transformer: ``transformer.resblocks.i``, then its pooling
  (``ln_post``; the patch tokens); ``open_clip`` text transformer of a ``CLIP`` model:
  ``transformer.resblocks.i`` with the causal mask, then ``ln_final``. Adapters on the MLP's
  ``mlp.c_fc`` and ``mlp.c_proj`` only: the attention is ``nn.MultiheadAttention``, whose
  forward reads its projection weights directly (an adapter on ``attn.out_proj`` would never
  run).
- Hugging Face BERT-style encoders: ``encoder.layer.i`` with the padding mask (no final
  norm); adapters on ``attention.self.query``/``key``/``value``, ``attention.output.dense``,
  ``intermediate.dense`` and ``output.dense``.

A CNN (a timm ResNet) has no transformer blocks: adapters on it are refused.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fedmm.common.model_config import ModelConfig
    from fedmm.common.pretrained.frozen_encoders import (
        FrozenEncoders,
        FrozenImageEncoder,
        FrozenTextEncoder,
    )

TIMM_VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
OPEN_CLIP_TARGETS = ("mlp.c_fc", "mlp.c_proj")
BERT_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass(frozen=True)
class BlockLayout:
    """An encoder's transformer blocks, in order, and what the tail needs to finish."""

    kind: str  # "timm_vit", "open_clip_visual", "open_clip_text" or "bert"
    blocks: nn.ModuleList | nn.Sequential
    targets: tuple[str, ...]  # the adapted Linear layers, relative to a block
    batch_first: bool = True
    owner: nn.Module | None = None  # the module holding the finish (norm, pooling, mask)

    def __len__(self) -> int:
        return len(self.blocks)


def image_block_layout(encoder: FrozenImageEncoder) -> BlockLayout | None:
    """The image encoder's blocks, or None when it has no transformer blocks (a CNN)."""
    module = encoder.module
    if encoder.spec.kind == "timm":
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(module, VisionTransformer):
            targets = _present(module.blocks, TIMM_VIT_TARGETS)
            return BlockLayout("timm_vit", module.blocks, targets, owner=module)
        return None
    from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer

    if isinstance(module, OpenClipVisionTransformer):
        return _open_clip_layout("open_clip_visual", module)
    return None


def _open_clip_layout(kind: str, module: nn.Module) -> BlockLayout:
    """An OpenCLIP tower's residual blocks (its vision transformer, or the CLIP model for the
    text tower), adapters on their ``OPEN_CLIP_TARGETS``."""
    transformer = module.transformer
    return BlockLayout(
        kind,
        transformer.resblocks,
        _present(transformer.resblocks, OPEN_CLIP_TARGETS),
        batch_first=bool(getattr(transformer, "batch_first", True)),
        owner=module,
    )


def text_block_layout(encoder: FrozenTextEncoder) -> BlockLayout | None:
    """The text encoder's blocks, or None when adapters are not supported on it."""
    module = encoder.module
    if encoder.spec.kind == "open_clip":
        if hasattr(module, "text"):  # CustomTextCLIP: a text tower of another library
            return None
        return _open_clip_layout("open_clip_text", module)
    layers = getattr(getattr(module, "encoder", None), "layer", None)
    if layers is None or not len(layers):
        return None
    targets = _present(layers, BERT_TARGETS)
    return BlockLayout("bert", layers, targets) if "attention.self.query" in targets else None


def _present(blocks: nn.ModuleList | nn.Sequential, names: tuple[str, ...]) -> tuple[str, ...]:
    modules = dict(blocks[0].named_modules()) if len(blocks) else {}
    return tuple(n for n in names if isinstance(modules.get(n), nn.Linear))


def adapted_layouts(
    config: ModelConfig, encoders: FrozenEncoders
) -> tuple[BlockLayout | None, BlockLayout | None]:
    """The layouts of the encoders that get adapters (None for a frozen one); a ValueError
    names the run-config key and the fix when an encoder cannot take them."""
    sides = (
        ("image", config.image_lora_blocks, encoders.image, image_block_layout),
        ("text", config.text_lora_blocks, encoders.text, text_block_layout),
    )
    layouts: list[BlockLayout | None] = []
    for side, blocks, encoder, layout_of in sides:
        if not blocks:
            layouts.append(None)
            continue
        layout = layout_of(encoder)  # type: ignore[operator]
        other = "text" if side == "image" else "image"
        if layout is None or not layout.targets:
            raise ValueError(
                f"run config 'model-lora-blocks' = {blocks} with model-lora-encoders = "
                f"{config.lora_encoders!r}: LoRA needs a transformer {side} encoder, and "
                f"{encoder.spec.name} has no transformer blocks that take adapters (a timm "
                "ViT, an OpenCLIP CLIP model or a BERT-style encoder do): set "
                f"model-lora-encoders = '{other}', or model-lora-blocks = 0"
            )
        if blocks > len(layout):
            raise ValueError(
                f"run config 'model-lora-blocks' = {blocks} is more than the {len(layout)} "
                f"transformer blocks of the {side} encoder {encoder.spec.name}: use at most "
                f"{len(layout)}"
            )
        layouts.append(layout)
    return layouts[0], layouts[1]


def resolve_lora_targets(config: ModelConfig, encoders: FrozenEncoders) -> ModelConfig:
    """``config`` with ``lora_targets`` naming the adapted layers of each encoder (the
    model config records them); a ValueError when an encoder cannot take adapters."""
    if not config.lora_blocks:
        return config
    image, text = adapted_layouts(config, encoders)
    described: dict[str, Any] = {}
    for side, layout, blocks in (
        ("image", image, config.image_lora_blocks),
        ("text", text, config.text_lora_blocks),
    ):
        if layout is not None:
            first = len(layout) - blocks
            described[side] = {
                "blocks": list(range(first, len(layout))),
                "of": len(layout),
                "layers": list(layout.targets),
            }
    return replace(config, lora_targets=json.dumps(described, sort_keys=True))


class _StopAtBlock(Exception):
    """Ends an encoder's forward pass at the block whose input was wanted."""


def _capture_block_input(
    layout: BlockLayout, first: int, run: Callable[[], object]
) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        captured.append(x if layout.batch_first else x.transpose(0, 1))
        raise _StopAtBlock

    handle = layout.blocks[first].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _StopAtBlock:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {first} of the encoder did not run")
    return captured[0]


def block_input_image_encoder(
    encoder: FrozenImageEncoder, adapted_blocks: int
) -> FrozenImageEncoder:
    """The same encoder whose "tokens" are the hidden states entering its first adapted
    block (the whole encoder's tokens when ``adapted_blocks`` is 0)."""
    if not adapted_blocks:
        return encoder
    layout = image_block_layout(encoder)
    assert layout is not None
    first = len(layout) - adapted_blocks

    def tokens_of(x: torch.Tensor) -> torch.Tensor:
        return _capture_block_input(layout, first, lambda: encoder.tokens_of(x))

    return replace(encoder, tokens_of=tokens_of)


def block_input_text_encoder(encoder: FrozenTextEncoder, adapted_blocks: int) -> FrozenTextEncoder:
    """The same encoder whose token states are those entering its first adapted block."""
    if not adapted_blocks:
        return encoder
    layout = text_block_layout(encoder)
    assert layout is not None
    first = len(layout) - adapted_blocks

    def tokens_of(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return _capture_block_input(layout, first, lambda: encoder.tokens_of(ids, valid))

    return replace(encoder, tokens_of=tokens_of)


class _OpenClipPooling(nn.Module):
    """The open_clip vision transformer's pooling after its blocks (``_pool``), on copies
    of its modules: the patch tokens, after ``ln_post``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.attn_pool = copy.deepcopy(getattr(visual, "attn_pool", None))
        self.attn_pool_contrastive = copy.deepcopy(getattr(visual, "attn_pool_contrastive", None))
        self.attn_pool_type = getattr(visual, "attn_pool_type", None)
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))
        self.pool_type = visual.pool_type

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from open_clip.transformer import VisionTransformer

        return VisionTransformer._global_pool(self, x)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import VisionTransformer

        _pooled, tokens = VisionTransformer._pool(self, x)  # type: ignore[arg-type]
        return tokens


class EncoderTail(nn.Module):
    """An encoder's last blocks (copies, so that adapters on them change no other model)
    and its finish, run on the hidden states entering them: ``(M, T, D)`` states (and, for
    text, their validity ``(M, T)``) to the encoder's output tokens. Always in eval mode
    (no dropout: the frozen encoder's function, plus the adapters)."""

    def __init__(self, layout: BlockLayout, adapted_blocks: int) -> None:
        super().__init__()
        if not 1 <= adapted_blocks <= len(layout):
            raise ValueError(f"adapted blocks must be in [1, {len(layout)}]")
        self.kind = layout.kind
        self.batch_first = layout.batch_first
        self.blocks = nn.ModuleList(
            copy.deepcopy(block) for block in list(layout.blocks)[len(layout) - adapted_blocks :]
        )
        self.finish: nn.Module | None = None
        if layout.kind == "timm_vit":
            self.finish = copy.deepcopy(layout.owner.norm)
        elif layout.kind == "open_clip_visual":
            self.finish = _OpenClipPooling(layout.owner)
        elif layout.kind == "open_clip_text":
            self.finish = copy.deepcopy(layout.owner.ln_final)
            mask = layout.owner.attn_mask
            self.register_buffer(
                "causal_mask", None if mask is None else mask.clone(), persistent=False
            )
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> EncoderTail:
        """Stays in eval mode: the blocks' dropout is off, as in the frozen encoder."""
        return super().train(False)

    def _run_blocks(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in self.blocks:
            x = block(x, **kwargs)
        return x if self.batch_first else x.transpose(0, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "timm_vit":
            return self.finish(self._run_blocks(x))  # type: ignore[misc]
        if self.kind == "open_clip_visual":
            return self.finish(self._run_blocks(x, attn_mask=None))  # type: ignore[misc]
        if valid is None:
            raise ValueError("a text encoder's tail needs the tokens' validity")
        if self.kind == "open_clip_text":  # causal: the first T positions need no others
            length = x.shape[1]
            mask = self.causal_mask
            mask = None if mask is None else mask[:length, :length].to(x.dtype)
            out = self.finish(self._run_blocks(x, attn_mask=mask))  # type: ignore[misc]
        else:  # bert: padded positions are masked out of every attention
            additive = (1.0 - valid[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            out = x
            for block in self.blocks:
                result = block(out, additive)
                out = result[0] if isinstance(result, tuple) else result
        return out * valid[..., None].to(out.dtype)
