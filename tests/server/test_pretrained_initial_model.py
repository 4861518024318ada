# ruff: noqa: E402 (torchvision is imported through its shim before timm and open_clip)
"""The coordinator's initial model with pretrained encoders: the fusion head, with LoRA
adapters when the run asks for them, and a ConfigError (which ``fedmm simulate`` prints as
one line, exit code 2) naming the key and the fix when the encoders cannot take them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmm.common.pretrained.torchvision_shim import import_torchvision

import_torchvision()
pytest.importorskip("open_clip")
pytest.importorskip("peft")

from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.pretrained.lora_adapters import AdaptedFusionMatcher
from fedmm.server.federation import initial_model
from fedmm.simulations.random_encoders import write_random_open_clip
from tests.common.test_lora_adapters import run_config


def test_the_initial_model_has_the_adapters_or_a_config_error_names_the_key(
    tmp_path: Path,
) -> None:
    weights = {"clip": write_random_open_clip(tmp_path / "clip")}
    model = initial_model(FederationConfig.from_run_config(run_config(weights, "clip", blocks=1)))
    assert isinstance(model, AdaptedFusionMatcher)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(model.state_dict())  # what the SecAgg+ vectors are sized on
    too_many = FederationConfig.from_run_config(run_config(weights, "clip", blocks=3))
    with pytest.raises(ConfigError, match="'model-lora-blocks' = 3 is more than the 2"):
        initial_model(too_many)
