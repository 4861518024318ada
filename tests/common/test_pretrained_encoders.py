# ruff: noqa: E402 (torchvision is imported through its shim before timm and open_clip)
"""Frozen pretrained encoders load from local files exactly as a run names them.

Small randomly initialised instances of real architectures (timm's ``test_vit`` and
``test_resnet``, a 2-layer BERT with a WordPiece tokenizer, a 2-block OpenCLIP model) are
saved to a temporary directory in their hubs' layouts (``simulations.random_encoders``) and
loaded through the run config's keys and ``load_frozen_encoders``, the path a run takes. No
network is used.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.common.pretrained.torchvision_shim import import_torchvision

import_torchvision()  # before timm and open_clip import it (the CPU torch build)
pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from fedmm.common.federation_config import (
    ConfigError,
    FederationConfig,
    encoder_specs_of,
)
from fedmm.common.model_config import ModelConfig
from fedmm.common.pretrained.encoder_spec import (
    EncoderSpec,
    FrozenWeightsError,
    check_weights,
    weights_digest,
)
from fedmm.common.pretrained.frozen_encoders import (
    load_frozen_encoders,
    load_timm_image_encoder,
    resolve_model_config,
)
from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher, build_matcher
from tests.common.random_weights import write_test_weights

CAPTIONS = ["a red dress", "two blue shirts on the left", ""]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_test_weights(tmp_path_factory.mktemp("weights"), ["dress", "shirts"])


def _run_config(image: str, image_dir: Path, text: str, text_dir: Path | None) -> dict:
    config = {
        "model-image-encoder": image,
        "model-image-weights": str(image_dir),
        "model-image-weights-sha256": weights_digest(image_dir),
        "model-text-encoder": text,
        "image-size": "32x32",
        "image-channels": 3,
    }
    if text_dir is not None:
        config["model-text-weights"] = str(text_dir)
        config["model-text-weights-sha256"] = weights_digest(text_dir)
    return config


def _load(run_config: dict):
    config = FederationConfig.from_run_config(run_config)
    encoders = load_frozen_encoders(*encoder_specs_of(config))
    from fedmm.common.train_request import model_config_of

    return encoders, resolve_model_config(model_config_of(config), encoders)


@pytest.mark.parametrize("image", ["vit", "resnet"])
def test_a_timm_backbone_and_a_bert_encoder_give_frozen_token_features(
    weights: dict[str, Path], image: str
) -> None:
    arch = {"vit": "timm:test_vit", "resnet": "timm:test_resnet"}[image]
    encoders, config = _load(_run_config(arch, weights[image], "hf:bert-tiny", weights["bert"]))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tokens = encoders.image.features(images)
    assert tokens.shape[0] == 3 and tokens.shape[2] == config.image_feature_dim
    assert tokens.shape[1] >= 1 and torch.isfinite(tokens).all()
    states, valid = encoders.text.features(CAPTIONS, 12)
    assert states.shape == (3, 12, config.text_feature_dim) == (3, 12, 32)
    assert valid[0].sum() == 5 and valid[1].sum() > valid[0].sum()  # [CLS] a red dress [SEP]
    assert valid[2].sum() == 2  # an empty caption: [CLS] [SEP]
    for module in (encoders.image.module, encoders.text.module):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training
    preprocessing = json.loads(config.image_preprocessing)
    assert preprocessing["encoder"] == arch and preprocessing["mean"] == [0.5, 0.5, 0.5]
    tokenizer = json.loads(config.text_tokenizer)
    assert tokenizer["tokenizer"].startswith("BertTokenizer") and tokenizer["max_tokens"] == 12


def test_an_open_clip_checkpoint_gives_both_encoders_with_its_own_tokenizer(
    weights: dict[str, Path],
) -> None:
    run_config = _run_config("open_clip:tiny", weights["clip"], "open_clip:tiny", None)
    encoders, config = _load(run_config)
    assert config.text_weights_sha256 == config.image_weights_sha256
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert tuple(encoders.image.features(images).shape) == (2, 16, 64)  # 4x4 patches of 8
    states, valid = encoders.text.features(CAPTIONS, 8)
    assert states.shape == (3, 8, 64)
    # <start> a red dress <end>: CLIP's BPE tokenizer, cut to 8 tokens for the long caption
    assert valid.sum(1).tolist() == [5, 8, 2]
    assert json.loads(config.text_tokenizer)["tokenizer"] == "SimpleTokenizer"
    assert json.loads(config.image_preprocessing)["std"][0] == pytest.approx(0.26863)


def test_the_same_open_clip_weights_give_the_same_features_as_open_clip_itself(
    weights: dict[str, Path],
) -> None:
    """The image tokens are the vision transformer's own (not re-implemented): its pooled
    output from open_clip's ``encode_image`` is the pooling of the same forward pass."""
    import open_clip

    encoders, _config = _load(
        _run_config("open_clip:tiny", weights["clip"], "open_clip:tiny", None)
    )
    model = open_clip.create_model(f"local-dir:{weights['clip']}")
    model.eval()
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = encoders.image.normalise(torch.from_numpy(images))
    with torch.no_grad():
        expected = model.encode_image(x)
        pooled, tokens = encoders.image.module(x)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(tokens, encoders.image.features(images))
    with torch.no_grad():  # the text side: pooling our token states at <end> = encode_text
        ids = open_clip.get_tokenizer(f"local-dir:{weights['clip']}")(CAPTIONS[:2])
        states, _valid = encoders.text.features(CAPTIONS[:2], 77)
        ends = ids.argmax(dim=-1)
        pooled_text = states[torch.arange(2), ends] @ model.text_projection
        torch.testing.assert_close(pooled_text, model.encode_text(ids), rtol=1e-4, atol=1e-5)


def test_a_timm_weights_file_loads_by_architecture_name(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model("test_vit", num_classes=0)
    path = tmp_path / "test_vit.safetensors"
    save_file(reference.state_dict(), str(path))
    encoder = load_timm_image_encoder(
        EncoderSpec("timm", "test_vit", str(path), weights_digest(path))
    )
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(encoder.module.state_dict()[name], value)


def test_mismatched_weights_are_refused_before_loading(
    weights: dict[str, Path], tmp_path: Path
) -> None:
    run_config = _run_config("timm:test_vit", weights["vit"], "hf:bert-tiny", weights["bert"])
    run_config["model-image-weights-sha256"] = "0" * 64
    config = FederationConfig.from_run_config(run_config)
    with pytest.raises(FrozenWeightsError, match=r"not the weights the run was started with"):
        load_frozen_encoders(*encoder_specs_of(config))
    copy = tmp_path / "bert"
    copy.mkdir()
    for file in weights["bert"].iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    spec = EncoderSpec("hf", "bert-tiny", str(copy), weights_digest(weights["bert"]))
    check_weights(spec)  # an identical copy elsewhere is the same weights
    (copy / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")  # an edited tokenizer file
    with pytest.raises(FrozenWeightsError):
        check_weights(spec)
    with pytest.raises(FrozenWeightsError, match="do not exist"):
        check_weights(spec.at(tmp_path / "missing"))


def test_the_run_config_names_both_encoders_with_weights_and_digests(
    weights: dict[str, Path],
) -> None:
    good = _run_config("timm:test_vit", weights["vit"], "hf:bert-tiny", weights["bert"])
    with pytest.raises(ConfigError, match=r"model-image-weights-sha256"):
        FederationConfig.from_run_config({**good, "model-image-weights-sha256": "abc"})
    with pytest.raises(ConfigError, match=r"needs a pretrained partner"):
        FederationConfig.from_run_config({**good, "model-text-encoder": "hashing"})
    with pytest.raises(ConfigError, match=r"'timm:<arch>'"):
        FederationConfig.from_run_config({**good, "model-image-encoder": "vit"})
    with pytest.raises(ConfigError, match=r"dp-mode"):
        FederationConfig.from_run_config({**good, "dp-mode": "distributed"})


def test_the_fusion_head_holds_only_trained_parameters(weights: dict[str, Path]) -> None:
    _encoders, config = _load(
        _run_config("open_clip:tiny", weights["clip"], "open_clip:tiny", None)
    )
    head = build_matcher(replace(config, width=16))
    assert isinstance(head, FeatureFusionMatcher)
    assert all(p.requires_grad for p in head.parameters())
    # the frozen encoders hold ~3.5M parameters; the head a few thousand, all it sends
    assert sum(p.numel() for p in head.parameters()) < 20_000
    assert not any("visual" in k or "token_embedding" in k for k in head.state_dict())
    assert ModelConfig.from_dict(config.to_dict()) == config  # saved with the model
    scores = head(torch.randn(2, 16, 64), torch.randn(2, 3, 5, 64), torch.ones(2, 3, 5).bool())
    assert scores.shape == (2, 3)
