# ruff: noqa: E402 (torchvision is imported through its shim before timm and open_clip)
"""LoRA adapters on the last blocks of pretrained encoders (``common.pretrained``).

The split is exact: the hidden states entering the first adapted block, run through the
copied last blocks and the encoder's finish, give the frozen encoder's own tokens (timm ViT,
BERT, OpenCLIP image and text). Bad settings are refused with the key and the fix; the
trained model's state holds the head and the adapters only, and the model config records
which layers are adapted. Tiny random encoders in their hubs' layouts, no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.common.pretrained.torchvision_shim import import_torchvision

import_torchvision()
pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("peft")

from fedmm.common.federation_config import ConfigError, FederationConfig, encoder_specs_of
from fedmm.common.model_config import ModelConfig
from fedmm.common.pretrained.encoder_blocks import (
    EncoderTail,
    block_input_image_encoder,
    block_input_text_encoder,
    image_block_layout,
    text_block_layout,
)
from fedmm.common.pretrained.encoder_spec import weights_digest
from fedmm.common.pretrained.frozen_encoders import load_frozen_encoders, resolve_model_config
from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher
from fedmm.common.pretrained.lora_adapters import AdaptedFusionMatcher, build_fusion_model
from fedmm.common.train_request import model_config_of
from tests.common.random_weights import write_test_weights

CAPTIONS = ["a red dress", "two blue shirts on the left side of it", ""]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_test_weights(tmp_path_factory.mktemp("weights"), ["dress", "shirts"])


def run_config(weights: dict[str, Path], pair: str, **lora: object) -> dict:
    if pair == "clip":
        config = {
            "model-image-encoder": "open_clip:tiny",
            "model-text-encoder": "open_clip:tiny",
            "model-image-weights": str(weights["clip"]),
            "model-image-weights-sha256": weights_digest(weights["clip"]),
        }
    else:
        image = "vit" if pair == "vit+bert" else "resnet"
        config = {
            "model-image-encoder": f"timm:test_{image}",
            "model-image-weights": str(weights[image]),
            "model-image-weights-sha256": weights_digest(weights[image]),
            "model-text-encoder": "hf:bert-tiny",
            "model-text-weights": str(weights["bert"]),
            "model-text-weights-sha256": weights_digest(weights["bert"]),
        }
    config.update({"image-size": "32x32", "image-channels": 3, "model-width": 16})
    config.update({f"model-lora-{k}": v for k, v in lora.items()})
    return config


def load(config: dict):
    settings = FederationConfig.from_run_config(config)
    encoders = load_frozen_encoders(*encoder_specs_of(settings))
    return encoders, resolve_model_config(model_config_of(settings), encoders)


def _images(count: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("pair", ["vit+bert", "clip"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_the_last_blocks_on_cached_block_inputs_give_the_frozen_encoders_tokens(
    weights: dict[str, Path], pair: str, blocks: int
) -> None:
    encoders, _config = load(run_config(weights, pair))
    image_layout = image_block_layout(encoders.image)
    text_layout = text_block_layout(encoders.text)
    assert image_layout is not None and text_layout is not None
    assert len(text_layout) == 2 and len(image_layout) >= 2  # test_vit has 6
    frozen = encoders.image.features(_images())
    hidden = block_input_image_encoder(encoders.image, blocks).features(_images())
    with torch.no_grad():
        tail = EncoderTail(image_layout, blocks)(hidden)
    torch.testing.assert_close(tail, frozen, rtol=1e-4, atol=1e-4)
    if blocks < 2:
        assert not torch.allclose(hidden[:, -frozen.shape[1] :], frozen, atol=1e-2)
    frozen_text, valid = encoders.text.features(CAPTIONS, 12)
    hidden_text, hidden_valid = block_input_text_encoder(encoders.text, blocks).features(
        CAPTIONS, 12
    )
    assert torch.equal(valid, hidden_valid) and not valid.all()
    with torch.no_grad():
        text_tail = EncoderTail(text_layout, blocks)(hidden_text, valid)
    torch.testing.assert_close(text_tail, frozen_text, rtol=1e-4, atol=1e-4)


def test_bad_lora_settings_are_refused_with_the_key_and_the_fix(
    weights: dict[str, Path],
) -> None:
    with pytest.raises(ValueError, match="'model-lora-blocks' = 3 is more than the 2 transformer"):
        load(run_config(weights, "vit+bert", blocks=3))
    with pytest.raises(ValueError, match=r"LoRA needs a transformer image encoder.*test_resnet"):
        load(run_config(weights, "resnet+bert", blocks=1))
    _encoders, text_only = load(run_config(weights, "resnet+bert", blocks=1, encoders="text"))
    assert text_only.image_lora_blocks == 0 and text_only.text_lora_blocks == 1
    with pytest.raises(ConfigError, match="'model-lora-blocks' = -1 is invalid"):
        FederationConfig.from_run_config(run_config(weights, "clip", blocks=-1))
    with pytest.raises(ConfigError, match="'model-lora-rank' = 0 is invalid"):
        FederationConfig.from_run_config(run_config(weights, "clip", blocks=1, rank=0))
    with pytest.raises(ConfigError, match="'model-lora-encoders' = 'both-ish'"):
        FederationConfig.from_run_config(run_config(weights, "clip", blocks=1, encoders="both-ish"))
    with pytest.raises(ConfigError, match="'model-lora-blocks' = 1 needs pretrained encoders"):
        FederationConfig.from_run_config({"model-lora-blocks": 1})


@pytest.mark.parametrize("pair", ["vit+bert", "clip"])
def test_the_trained_state_is_the_head_and_the_adapters_and_the_config_says_which(
    weights: dict[str, Path], pair: str
) -> None:
    encoders, config = load(run_config(weights, pair, blocks=1, rank=4, alpha=8.0))
    targets = json.loads(config.lora_targets)
    image_blocks = 6 if pair == "vit+bert" else 2  # timm's test_vit has 6
    assert targets["image"] == {**targets["image"], "blocks": [image_blocks - 1]}
    assert targets["text"]["blocks"] == [1] and targets["text"]["of"] == 2
    expected_layers = (
        ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
        if pair == "vit+bert"
        else ["mlp.c_fc", "mlp.c_proj"]
    )
    assert targets["image"]["layers"] == expected_layers
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    torch.manual_seed(0)
    model = build_fusion_model(config, encoders)
    assert isinstance(model, AdaptedFusionMatcher)
    state = model.state_dict()
    head = set(FeatureFusionMatcher(config).state_dict())
    adapters = set(state) - head
    assert head <= set(state) and adapters
    assert all(".lora_A." in n or ".lora_B." in n for n in adapters), adapters
    assert {n.split(".")[0] for n in adapters} == {"image_tail", "text_tail"}
    layers_per_side = len(expected_layers) if pair == "clip" else None
    if layers_per_side:  # one A and one B per adapted layer of the one adapted block
        assert sum(n.startswith("image_tail.") for n in adapters) == 2 * layers_per_side
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(state)
    rank = {int(state[n].shape[0]) for n in adapters if ".lora_A." in n}
    assert rank == {4}
    other = build_fusion_model(config, encoders)
    other.load_state_dict(state)  # strict: the frozen copies are neither sent nor missing
    for name, value in other.state_dict().items():
        assert torch.equal(value, state[name])
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in state.items() if k not in adapters})
    frozen_config = load(run_config(weights, pair))[1]
    assert type(build_fusion_model(frozen_config, encoders)) is FeatureFusionMatcher
