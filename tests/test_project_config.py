"""The Flower App config in pyproject.toml is the coordinator's config, key for key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.federation_config import ConfigError, FederationConfig
from common.train_request import TrainRequest

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_app_config_matches_federation_config_defaults() -> None:
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert FederationConfig.from_run_config(app["config"]) == FederationConfig()
    assert set(app["config"]) == set(FederationConfig().to_run_config())


def test_unknown_or_bad_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="batchsize"):
        FederationConfig.from_run_config({"batchsize": 3})
    with pytest.raises(ConfigError, match="fraction-train"):
        FederationConfig.from_run_config({"fraction-train": 1.5})
    with pytest.raises(ConfigError, match="num-server-rounds"):
        FederationConfig.from_run_config({"num-server-rounds": "many"})
    with pytest.raises(ConfigError, match=r"model-image-encoder.*'patches', 'conv'"):
        FederationConfig.from_run_config({"model-image-encoder": "resnet"})
    with pytest.raises(ConfigError, match=r"model-activation.*'gelu', 'tanh'"):
        FederationConfig.from_run_config({"model-activation": "relu"})


def test_cosine_schedule_decays_the_sites_learning_rate_over_the_rounds() -> None:
    config = FederationConfig.from_run_config(
        {"learning-rate": 0.01, "learning-rate-schedule": "cosine", "num-server-rounds": 4}
    )
    rates = [TrainRequest.for_round(config, r).learning_rate for r in (1, 2, 3, 4)]
    assert rates == pytest.approx(
        [0.01, 0.01 * (1 + 0.5**0.5) / 2, 0.005, 0.01 * (1 - 0.5**0.5) / 2]
    )
    constant = FederationConfig.from_run_config({"learning-rate": 0.01})
    assert TrainRequest.for_round(constant, 4).learning_rate == 0.01
    with pytest.raises(ConfigError, match="learning-rate-schedule"):
        FederationConfig.from_run_config({"learning-rate-schedule": "step"})
