"""Frozen pretrained encoders, loaded from local files by their own libraries.

- ``timm:<arch>``: an image backbone of ``timm`` (Wightman, PyTorch Image Models). Weights
  are a file (``.safetensors`` or ``.pth``) for the registered architecture ``<arch>``, or a
  directory as the Hugging Face hub holds a timm model (``config.json`` and
  ``model.safetensors``, loaded with timm's ``local-dir:``). Tokens: ``forward_features``,
  a ViT's tokens or the cells of a CNN's last feature map.
- ``open_clip:<arch>``: an image-text pair of ``open_clip`` (Ilharco et al.; Cherti et al.,
  CVPR 2023). Weights are a checkpoint file for the built-in configuration ``<arch>``, or a
  directory as the hub holds one (``open_clip_config.json`` with its model and
  preprocessing configuration, and ``open_clip_model.safetensors``, loaded with
  ``local-dir:``). Image tokens: the vision transformer's patch tokens; text tokens: the
  text transformer's last layer (after ``ln_final``), with the package's own BPE tokenizer.
- ``hf:<name>``: a text encoder of Hugging Face ``transformers``: a directory with
  ``config.json``, the weights and the tokenizer files (``AutoModel`` and
  ``AutoTokenizer``, ``local_files_only``). Tokens: ``last_hidden_state``.

Each encoder is frozen (``requires_grad`` off, ``eval``) and its digest is checked against
the run's pin before it is built (``encoder_spec.check_weights``). The preprocessing is the
encoder's own normalisation (its mean and standard deviation) of images already letterboxed
to its input size by the site's loader; the tokenizer is its own. Both are recorded in the
model config (:func:`resolve_model_config`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmm.common.model_config import ModelConfig, format_image_size
from fedmm.common.pretrained.encoder_spec import EncoderSpec, FrozenWeightsError, check_weights
from fedmm.common.pretrained.hub_weights import resolve_spec
from fedmm.common.pretrained.torchvision_shim import import_torchvision


class PretrainedLibraryMissing(ImportError):
    """The optional libraries of pretrained encoders are not installed."""


def _require(module: str) -> Any:
    try:
        if module in ("timm", "open_clip"):
            import_torchvision()
        return __import__(module)
    except ImportError as error:
        raise PretrainedLibraryMissing(
            f"pretrained encoders need the optional libraries: pip install 'fedmm[pretrained]' "
            f"({module} is missing: {error})"
        ) from error


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@dataclass
class FrozenImageEncoder:
    """Images to frozen patch tokens ``(N, P, feature_dim)``."""

    spec: EncoderSpec
    module: nn.Module
    tokens_of: Callable[[torch.Tensor], torch.Tensor]  # normalised (N, 3, H, W) -> (N, P, D)
    input_size: tuple[int, int] | None  # None: any size (a CNN)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int

    def preprocessing(self, image_size: tuple[int, int]) -> dict[str, Any]:
        """What is done to a record's image before the encoder, as the model config keeps it."""
        return {
            "encoder": self.spec.name,
            "resize": f"letterbox (Lanczos) to {format_image_size(*image_size)}",
            "channels": "RGB (grayscale repeated)",
            "scale": "1/255",
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
        }

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` ``(N, H, W)`` or ``(N, H, W, 3)`` to normalised ``(N, 3, H, W)``."""
        x = images.float() / 255.0
        x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        return ((x - mean) / std).contiguous()

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor, batch: int = 32) -> torch.Tensor:
        """Tokens ``(N, P, feature_dim)`` (float32) of ``uint8`` images at the input size."""
        images = torch.as_tensor(images)
        if self.input_size is not None and tuple(images.shape[1:3]) != self.input_size:
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} do not fit {self.spec.name}, "
                f"which takes {format_image_size(*self.input_size)}: set run config "
                f"image-size = '{format_image_size(*self.input_size)}'"
            )
        parts = [
            self.tokens_of(self.normalise(images[i : i + batch])).float()
            for i in range(0, len(images), batch)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, 0, self.feature_dim)


@dataclass
class FrozenTextEncoder:
    """Captions to frozen token states ``(N, T, feature_dim)`` and their validity ``(N, T)``."""

    spec: EncoderSpec
    module: nn.Module
    #: captions, max tokens -> (ids, valid), then (ids, valid) -> token states
    tokenize: Callable[[Sequence[str], int], tuple[torch.Tensor, torch.Tensor]]
    tokens_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    feature_dim: int
    tokenizer_description: dict[str, Any]

    @torch.no_grad()
    def features(
        self, captions: Sequence[str], max_tokens: int, batch: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``(N, max_tokens, D)`` (float32, zero where invalid) and validity."""
        states, valid = [], []
        for start in range(0, len(captions), batch):
            ids, mask = self.tokenize(list(captions[start : start + batch]), max_tokens)
            out = self.tokens_of(ids, mask).float()[:, :max_tokens]
            mask = mask[:, :max_tokens]
            padded = torch.zeros(len(ids), max_tokens, self.feature_dim)
            padded[:, : out.shape[1]] = out * mask[..., None]
            flags = torch.zeros(len(ids), max_tokens, dtype=torch.bool)
            flags[:, : mask.shape[1]] = mask
            states.append(padded)
            valid.append(flags)
        if not states:
            empty = torch.zeros(0, max_tokens, self.feature_dim)
            return empty, torch.zeros(0, max_tokens, dtype=torch.bool)
        return torch.cat(states), torch.cat(valid)


# --- timm -------------------------------------------------------------------------------


def load_timm_image_encoder(spec: EncoderSpec) -> FrozenImageEncoder:
    timm = _require("timm")
    path = Path(spec.weights)
    if path.is_dir():
        model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    else:
        model = timm.create_model(
            spec.architecture,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay={"file": str(path), "num_classes": 0},
        )
    _freeze(model)
    data = timm.data.resolve_model_data_config(model)
    # A ViT's patch embedding fixes its input size (model_args may have changed it from the
    # data config's); a CNN takes any size.
    patch_embed = getattr(model, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None)
    if fixed is not None and getattr(patch_embed, "strict_img_size", True):
        input_size: tuple[int, int] | None = (int(fixed[0]), int(fixed[1]))
    else:
        input_size = None

    def tokens_of(x: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(x)
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out

    return FrozenImageEncoder(
        spec=spec,
        module=model,
        tokens_of=tokens_of,
        input_size=input_size,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        feature_dim=int(model.num_features),
    )


# --- open_clip ----------------------------------------------------------------------------


def _open_clip_model(spec: EncoderSpec) -> nn.Module:
    open_clip = _require("open_clip")
    path = Path(spec.weights)
    if path.is_dir():
        model = open_clip.create_model(f"local-dir:{path}", require_pretrained=True)
    else:
        model = open_clip.create_model(
            spec.architecture, pretrained=str(path), require_pretrained=True
        )
    return _freeze(model)


def _open_clip_tokenizer(spec: EncoderSpec) -> Any:
    open_clip = _require("open_clip")
    path = Path(spec.weights)
    return open_clip.get_tokenizer(f"local-dir:{path}" if path.is_dir() else spec.architecture)


def load_open_clip_image_encoder(spec: EncoderSpec, model: nn.Module) -> FrozenImageEncoder:
    visual = model.visual
    visual.output_tokens = True
    config = getattr(visual, "preprocess_cfg", {}) or {}
    size = config.get("size", visual.image_size)
    height, width = (size, size) if isinstance(size, int) else tuple(size)

    def tokens_of(x: torch.Tensor) -> torch.Tensor:
        _pooled, tokens = visual(x)
        return tokens

    width_of = getattr(visual, "width", None) or visual.transformer.width
    return FrozenImageEncoder(
        spec=spec,
        module=visual,
        tokens_of=tokens_of,
        input_size=(int(height), int(width)),
        mean=tuple(config.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(config.get("std", (0.26862954, 0.26130258, 0.27577711))),
        feature_dim=int(width_of),
    )


def load_open_clip_text_encoder(spec: EncoderSpec, model: nn.Module) -> FrozenTextEncoder:
    tokenizer = _open_clip_tokenizer(spec)
    context = int(getattr(tokenizer, "context_length", 77))

    def tokenize(captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(list(captions))
        return ids, ids != 0

    if hasattr(model, "text"):  # CustomTextCLIP: a text tower of its own
        tower = model.text
        tower.output_tokens = True

        def tokens_of(ids: torch.Tensor, _valid: torch.Tensor) -> torch.Tensor:
            _pooled, tokens = tower(ids)
            return tokens

        width = int(tower.width)
    else:  # CLIP: the text transformer is part of the model (CLIP.encode_text, unpooled)

        def tokens_of(ids: torch.Tensor, _valid: torch.Tensor) -> torch.Tensor:
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
            x = model.transformer(x, attn_mask=model.attn_mask)
            return model.ln_final(x)

        width = int(model.transformer.width)
    return FrozenTextEncoder(
        spec=spec,
        module=model,
        tokenize=tokenize,
        tokens_of=tokens_of,
        feature_dim=width,
        tokenizer_description={
            "encoder": spec.name,
            "tokenizer": type(tokenizer).__name__,
            "context_length": context,
        },
    )


# --- Hugging Face transformers ---------------------------------------------------------------


def load_hf_text_encoder(spec: EncoderSpec) -> FrozenTextEncoder:
    transformers = _require("transformers")
    path = Path(spec.weights)
    if not path.is_dir():
        raise FrozenWeightsError(
            f"model-text-weights = {spec.weights!r} for {spec.name} must be a directory "
            "holding config.json, the weights and the tokenizer files (save_pretrained)"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = _freeze(transformers.AutoModel.from_pretrained(str(path), local_files_only=True))

    def tokenize(captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        return encoded["input_ids"], encoded["attention_mask"].bool()

    def tokens_of(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=valid.long()).last_hidden_state

    return FrozenTextEncoder(
        spec=spec,
        module=model,
        tokenize=tokenize,
        tokens_of=tokens_of,
        feature_dim=int(model.config.hidden_size),
        tokenizer_description={
            "encoder": spec.name,
            "tokenizer": type(tokenizer).__name__,
            "vocab_size": int(tokenizer.vocab_size),
            "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
            "model_type": str(model.config.model_type),
        },
    )


# --- both ------------------------------------------------------------------------------------


@dataclass
class FrozenEncoders:
    """A run's frozen image and text encoders."""

    image: FrozenImageEncoder
    text: FrozenTextEncoder


_loaded: dict[tuple[EncoderSpec, EncoderSpec], FrozenEncoders] = {}


def load_frozen_encoders(image: EncoderSpec, text: EncoderSpec) -> FrozenEncoders:
    """Both encoders, each checked against its pinned digest first (FrozenWeightsError);
    kept per process (a simulation runs many sites in one), and checked again on every call
    (files that changed since they were loaded are refused; an unchanged file's digest is
    remembered by its path, size and modification time). Hub names are resolved to their
    local snapshot first (``hub_weights``)."""
    image, text = resolve_spec(image), resolve_spec(text)
    check_weights(image)
    check_weights(text)
    key = (image, text)
    if key in _loaded:
        return _loaded[key]
    clip_model = None
    if image.kind == "open_clip":
        clip_model = _open_clip_model(image)
        image_encoder = load_open_clip_image_encoder(image, clip_model)
    else:
        image_encoder = load_timm_image_encoder(image)
    if text.kind == "open_clip":
        same = clip_model is not None and text.weights == image.weights
        text_encoder = load_open_clip_text_encoder(
            text, clip_model if same else _open_clip_model(text)
        )
    else:
        text_encoder = load_hf_text_encoder(text)
    _loaded[key] = FrozenEncoders(image_encoder, text_encoder)
    while len(_loaded) > 2:
        _loaded.pop(next(iter(_loaded)))
    return _loaded[key]


def resolve_model_config(config: ModelConfig, encoders: FrozenEncoders) -> ModelConfig:
    """``config`` with the encoders' feature widths, preprocessing and tokenizer filled in,
    and the layers LoRA adapters go on (``encoder_blocks.resolve_lora_targets``); a
    ValueError names the run-config key when the image size is not the encoder's, or the
    encoders cannot take the adapters asked for."""
    fixed = encoders.image.input_size
    if fixed is not None and config.image_size != fixed:
        size = format_image_size(*fixed)
        raise ValueError(
            f"run config image-size = '{format_image_size(*config.image_size)}' is not the "
            f"input size of {encoders.image.spec.name}: set image-size = '{size}'"
        )
    from fedmm.common.pretrained.encoder_blocks import resolve_lora_targets

    resolved = replace(
        config,
        image_feature_dim=encoders.image.feature_dim,
        text_feature_dim=encoders.text.feature_dim,
        image_preprocessing=json.dumps(
            encoders.image.preprocessing(config.image_size), sort_keys=True
        ),
        text_tokenizer=json.dumps(
            {**encoders.text.tokenizer_description, "max_tokens": config.max_len},
            sort_keys=True,
        ),
    )
    return resolve_lora_targets(resolved, encoders)
