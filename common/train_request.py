"""What the coordinator asks of a site in one round (a ConfigRecord on the wire).

The values are requests. A site applies its own privacy policy on top: it may train with
more privacy than asked for, never less (``client.privacy_policy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fedmm.common.data.caption_bank import CaptionBank
from fedmm.common.data.word_lists import parse_word_lists
from fedmm.common.distractors import DistractorSettings
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model_config import ModelConfig, model_config_from_settings


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
    image_size: str  # "HEIGHTxWIDTH"
    image_channels: int
    model_patch_size: int
    model_vocab_buckets: int
    model_caption_words: int
    model_text_encoder: str
    model_image_weights: str  # the run's path; a site may keep its copy elsewhere
    model_image_weights_sha256: str
    model_text_weights: str
    model_text_weights_sha256: str
    model_lora_blocks: int
    model_lora_encoders: str
    model_lora_rank: int
    model_lora_alpha: float
    distractor_word_lists: str
    eval_fraction: float  # share of the site's records held out (client.held_out_split)
    caption_bank_sha256: str  # "" when the run has no caption bank
    caption_bank_zlib: bytes  # the bank file, zlib-compressed (common.data.caption_bank)

    @classmethod
    def for_round(cls, config: FederationConfig, server_round: int) -> TrainRequest:
        """The request of ``server_round``; the run's caption bank file is read (and checked
        against ``caption-bank-sha256``) to travel with it."""
        own = {"server_round", "caption_bank_zlib"}
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if f.name not in own}
        shared["learning_rate"] = config.learning_rate_in_round(server_round)
        bank = config.caption_bank_file()
        return cls(
            server_round=server_round,
            caption_bank_zlib=bank.to_wire() if bank is not None else b"",
            **shared,
        )

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

    def caption_bank(self) -> CaptionBank | None:
        """The caption bank this request carries, checked against the digest it names
        (``CaptionBankError`` when it does not match), or None."""
        if not self.caption_bank_sha256 and not self.caption_bank_zlib:
            return None
        return CaptionBank.from_wire(self.caption_bank_zlib, sha256=self.caption_bank_sha256)

    def distractor_settings(self) -> DistractorSettings:
        """Where this round's distractors come from (``common.distractors``)."""
        return DistractorSettings(
            word_lists=parse_word_lists(self.distractor_word_lists), bank=self.caption_bank()
        )


def model_config_of(source: FederationConfig | TrainRequest) -> ModelConfig:
    """The model both sides build from the run's ``model-*`` and ``image-*`` settings."""
    return model_config_from_settings(source)
