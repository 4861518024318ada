"""The Flower App config in pyproject.toml is the coordinator's config, key for key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.model_config import ModelConfig
from fedmm.common.train_request import TrainRequest, model_config_of

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_app_config_matches_federation_config_defaults() -> None:
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedmm.server.app:app",
        "clientapp": "fedmm.client.app:app",
    }
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


def test_image_and_text_geometry_come_from_the_run_config() -> None:
    config = FederationConfig.from_run_config(
        {
            "image-size": "64x48",
            "image-channels": 3,
            "model-patch-size": 8,
            "model-vocab-buckets": 4096,
            "model-caption-words": 24,
        }
    )
    request = TrainRequest.for_round(config, 1)
    model = request.model_config()
    assert model == model_config_of(config)
    assert (model.image_height, model.image_width, model.image_channels) == (64, 48, 3)
    assert (model.patch_size, model.vocab_buckets, model.max_len) == (8, 4096, 24)
    default = model_config_of(FederationConfig())
    assert default == ModelConfig()  # the benchmark's 28x56 grayscale model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image-size": "64"}, r"'image-size' = '64' is invalid: use HEIGHTxWIDTH"),
        ({"image-channels": 4}, r"'image-channels'\) is invalid: use 1 for grayscale or 3"),
        ({"image-size": "64x64"}, r"patch size 7 \(run config 'model-patch-size'\).*e\.g\. 8"),
        (
            {"image-size": "30x30", "model-image-encoder": "scatter"},
            r"'image-size'\) does not suit the scatter encoder",
        ),
        ({"model-caption-words": 100}, r"'model-caption-words'\) is invalid"),
        ({"distractor-word-lists": "smells"}, r"'distractor-word-lists'.*\['smells'\]"),
    ],
)
def test_bad_geometry_in_the_run_config_names_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FederationConfig.from_run_config(overrides)


def test_every_package_folder_is_installed_under_fedmm() -> None:
    """A new sub-package not listed in pyproject would import from a checkout and be missing
    from an installed release."""
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    root = PYPROJECT.parent
    folders = {"common", "client", "server", "simulations"}
    assert setuptools["package-dir"] == {f"fedmm.{name}": name for name in folders}
    on_disk = {
        "fedmm." + ".".join(init.parent.relative_to(root).parts)
        for name in folders
        for init in (root / name).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk
