"""What the coordinator asks of a site in one round (a ConfigRecord on the wire).

The values are requests. A site applies its own privacy policy on top: it may train with
more privacy than asked for, never less (``client.privacy_policy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from common.federation_config import FederationConfig
from common.model_config import ModelConfig


@dataclass(frozen=True)
class TrainRequest:
    server_round: int
    num_server_rounds: int
    epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier_floor: float
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    optimizer: str
    num_distractors: int
    partition: str
    dirichlet_alpha: float
    data_dir: str
    seed: int
    site_records_limit: int
    model_width: int
    model_heads: int
    model_image_layers: int
    model_text_layers: int
    model_image_encoder: str
    model_activation: str

    @classmethod
    def for_round(cls, config: FederationConfig, server_round: int) -> TrainRequest:
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if f.name != "server_round"}
        shared["learning_rate"] = config.learning_rate_in_round(server_round)
        return cls(server_round=server_round, **shared)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, record: dict[str, Any]) -> TrainRequest:
        missing = [f.name for f in fields(cls) if f.name not in record]
        if missing:
            raise ValueError(f"train request is missing {missing}")
        return cls(**{f.name: record[f.name] for f in fields(cls)})

    def model_config(self) -> ModelConfig:
        return model_config_of(self)


def model_config_of(source: FederationConfig | TrainRequest) -> ModelConfig:
    """The model both sides build from the run's ``model-*`` settings."""
    return ModelConfig(
        width=source.model_width,
        heads=source.model_heads,
        image_layers=source.model_image_layers,
        text_layers=source.model_text_layers,
        image_encoder=source.model_image_encoder,
        activation=source.model_activation,
    )
