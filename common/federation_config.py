"""The coordinator's run configuration (``[tool.flwr.app.config]``), parsed and checked."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from fedmm.common.data.caption_bank import CaptionBank, CaptionBankError
from fedmm.common.data.partitioning import PARTITION_SCHEMES
from fedmm.common.data.word_lists import parse_word_lists
from fedmm.common.model_config import ACTIVATIONS, IMAGE_ENCODERS, model_config_from_settings
from fedmm.common.pretrained.encoder_spec import (
    PRETRAINED_IMAGE_KINDS,
    EncoderSpec,
    pretrained_kind,
)
from fedmm.common.pretrained.hub_weights import is_hub_name, parse_hub_name

if TYPE_CHECKING:
    from fedmm.common.distractors import DistractorSettings

OPTIMIZERS = ("sgd", "adam")
LEARNING_RATE_SCHEDULES = ("constant", "cosine")
DP_MODES = ("local", "distributed")
COORDINATOR_EVAL = ("auto", "on", "off")
#: The built-in benchmark's image geometry: the coordinator's own evaluation needs it.
BENCHMARK_IMAGE_SIZE, BENCHMARK_IMAGE_CHANNELS = "28x56", 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ConfigError(ValueError):
    """A run-config value is missing or out of range; the message names key and fix."""


@dataclass(frozen=True)
class FederationConfig:
    num_server_rounds: int = 14
    fraction_train: float = 1.0
    #: Share of the connected sites sampled for each federated evaluation (at least the
    #: fewest a secure sum releases, ``secagg-min-sites``).
    fraction_evaluate: float = 1.0
    min_train_sites: int = 2
    min_available_sites: int = 2
    epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier_floor: float = 0.0
    local_epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 4.0
    momentum: float = 0.0
    optimizer: str = "sgd"
    learning_rate_schedule: str = "constant"  # learning rate by round; see below
    server_learning_rate: float = 1.0
    #: Released model: an EMA of the rounds' global models with this decay (0: the last one;
    #: post-processing, ``common.parameter_averaging``)
    average_decay: float = 0.0
    num_distractors: int = 4
    partition: str = "iid"
    dirichlet_alpha: float = 0.3
    data_dir: str = ""
    out_dir: str = "runs/flwr"
    resume: bool = False
    seed: int = 0
    round_timeout: float = 3600.0
    #: Stop the run after this many rounds in a row in which sites failed and none trained
    #: or refused (0: never): in simulation a site process the system killed stays dead.
    max_failed_rounds: int = 3
    site_records_limit: int = 0  # simulation only: 0 = a site's whole partition
    eval_single_items: int = 10000
    eval_scenes: int = 1000
    model_width: int = 32
    model_heads: int = 2
    model_image_layers: int = 1
    model_text_layers: int = 1
    model_image_encoder: str = "patches"  # common.model_config.IMAGE_ENCODERS
    model_activation: str = "gelu"  # "gelu" or "tanh" (common.model)
    image_size: str = "28x56"  # "HEIGHTxWIDTH" of the model's images (common.model_config)
    image_channels: int = 1  # 1: grayscale, 3: RGB
    model_patch_size: int = 7  # pixels per patch side of the "patches" encoder
    model_vocab_buckets: int = 768  # hash buckets of the tokenizer (common.tokenizer)
    model_caption_words: int = 12  # words of a caption the model reads
    # Pretrained encoders (common.pretrained): "hashing" is the built-in text encoder; a
    # pretrained pair names its frozen weights (a local file or directory) and their sha256.
    model_text_encoder: str = "hashing"
    model_image_weights: str = ""
    model_image_weights_sha256: str = ""
    model_text_weights: str = ""
    model_text_weights_sha256: str = ""
    # LoRA adapters (common.pretrained.lora_adapters) on the last model-lora-blocks transformer
    # blocks of the encoders model-lora-encoders names ("both", "image" or "text"); 0: frozen.
    model_lora_blocks: int = 0
    model_lora_encoders: str = "both"
    model_lora_rank: int = 8
    model_lora_alpha: float = 16.0
    distractor_word_lists: str = "fashion"  # public word lists for swaps (common.data)
    caption_bank: str = ""  # public caption file shipped to the sites ("" = none)
    caption_bank_sha256: str = ""  # its SHA-256; filled in from the file when empty
    secure_aggregation: bool = True
    secagg_bit_width: int = 32
    secagg_update_clip: float = 1.0
    secagg_max_weight: int = 100_000
    secagg_degree: int = 0  # 0: Bell et al.'s default for the number of sampled sites
    secagg_threshold: int = 0  # 0: the default that goes with the degree
    secagg_min_sites: int = 3  # fewest sites in a released sum (with the colluding fraction)
    secagg_colluding_fraction: float = 0.1  # gamma: sampled sites assumed to collude
    secagg_dropout_fraction: float = 0.2  # delta: sites assumed to drop out after setup
    secagg_stage_timeout: float = 600.0
    #: Active-coordinator mode (Bonawitz et al., CCS 2017, section 6): signed round keys
    #: checked against the federation roster, a consistency check before unmasking.
    secagg_active_coordinator: bool = False
    secagg_roster_file: str = ""  # the roster every site signed (simulation: made for it)
    #: Sites advertise their next round's fresh keys at unmask: rounds whose sampled sites
    #: all did run in three exchanges (setup and share keys in one).
    secagg_advertise_next_keys: bool = True
    dp_mode: str = "local"  # "local": DP-SGD at each site; "distributed": common/distributed_dp
    dp_sampling_rate: float = 0.04  # distributed: q, each record's chance to join a round
    dp_min_honest_sites: int = 0  # distributed: h the noise shares assume; 0 = every site
    eval_every: int = 5  # evaluate every N rounds and after the last (0: after the last only)
    eval_fraction: float = 0.2  # share of each site's records held out (client.held_out_split)
    federated_eval: bool = True  # evaluate at the sites on their held-out records (SecAgg+)
    coordinator_eval: str = "auto"  # the benchmark's test split: auto = when the geometry fits

    def __post_init__(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds", "an integer >= 1"),
            (0.0 < self.fraction_train <= 1.0, "fraction-train", "in (0, 1]"),
            (0.0 < self.fraction_evaluate <= 1.0, "fraction-evaluate", "in (0, 1]"),
            (self.min_train_sites >= 1, "min-train-sites", "an integer >= 1"),
            (self.min_available_sites >= 1, "min-available-sites", "an integer >= 1"),
            (self.epsilon > 0, "epsilon", "> 0, or inf for no DP"),
            (0.0 < self.delta < 1.0, "delta", "in (0, 1), below 1/records per site"),
            (self.max_grad_norm > 0, "max-grad-norm", "> 0"),
            (self.noise_multiplier_floor >= 0, "noise-multiplier-floor", ">= 0"),
            (self.local_epochs >= 1, "local-epochs", "an integer >= 1"),
            (self.batch_size >= 1, "batch-size", "an integer >= 1"),
            (self.learning_rate > 0, "learning-rate", "> 0"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (
                self.learning_rate_schedule in LEARNING_RATE_SCHEDULES,
                "learning-rate-schedule",
                f"one of {LEARNING_RATE_SCHEDULES}",
            ),
            (self.num_distractors >= 1, "num-distractors", "an integer >= 1"),
            (self.partition in PARTITION_SCHEMES, "partition", f"one of {PARTITION_SCHEMES}"),
            (self.dirichlet_alpha > 0, "dirichlet-alpha", "> 0"),
            (self.round_timeout > 0, "round-timeout", "> 0 seconds"),
            (self.max_failed_rounds >= 0, "max-failed-rounds", "an integer >= 0 (0: never stop)"),
            (self.site_records_limit >= 0, "site-records-limit", "an integer >= 0 (0: all)"),
            (1 <= self.eval_single_items <= 10000, "eval-single-items", "in [1, 10000]"),
            (1 <= self.eval_scenes <= 5000, "eval-scenes", "in [1, 5000]"),
            (
                self.model_image_encoder in IMAGE_ENCODERS
                or pretrained_kind(self.model_image_encoder) in PRETRAINED_IMAGE_KINDS,
                "model-image-encoder",
                f"one of {IMAGE_ENCODERS}, or 'timm:<arch>' / 'open_clip:<arch>' with "
                "model-image-weights",
            ),
            (self.model_activation in ACTIVATIONS, "model-activation", f"one of {ACTIVATIONS}"),
            (8 <= self.secagg_bit_width <= 53, "secagg-bit-width", "an integer in [8, 53]"),
            (
                math.isfinite(self.secagg_update_clip) and self.secagg_update_clip > 0,
                "secagg-update-clip",
                "> 0 (largest |entry| of a site's update that is summed unclipped)",
            ),
            (self.secagg_max_weight >= 1, "secagg-max-weight", "an integer >= 1"),
            (self.secagg_degree >= 0, "secagg-degree", "an integer >= 0 (0: default)"),
            (
                self.secagg_threshold == 0 or self.secagg_threshold >= 2,
                "secagg-threshold",
                "0 (default) or an integer >= 2",
            ),
            (
                self.secagg_min_sites >= 3,
                "secagg-min-sites",
                "an integer >= 3 (a sum over two sites reveals each site's update to the other)",
            ),
            (
                0 <= self.secagg_colluding_fraction < 1,
                "secagg-colluding-fraction",
                "a number in [0, 1)",
            ),
            (
                0 <= self.secagg_dropout_fraction < 1,
                "secagg-dropout-fraction",
                "a number in [0, 1)",
            ),
            (
                self.secagg_colluding_fraction + self.secagg_dropout_fraction < 1,
                "secagg-dropout-fraction",
                "a number below 1 - secagg-colluding-fraction",
            ),
            (self.secagg_stage_timeout > 0, "secagg-stage-timeout", "> 0 seconds"),
            (
                self.secure_aggregation or not self.secagg_active_coordinator,
                "secagg-active-coordinator",
                "false, or true with secure-aggregation = true (it hardens SecAgg+ rounds)",
            ),
            (self.dp_mode in DP_MODES, "dp-mode", f"one of {DP_MODES}"),
            (0 < self.dp_sampling_rate <= 1, "dp-sampling-rate", "in (0, 1]"),
            (self.dp_min_honest_sites >= 0, "dp-min-honest-sites", "an integer >= 0 (0: all)"),
            (
                self.eval_every >= 0,
                "eval-every",
                "an integer >= 0 (every N rounds and after the last; 0: after the last only)",
            ),
            (0.0 <= self.eval_fraction <= 0.9, "eval-fraction", "a number in [0, 0.9]"),
            (
                0.0 <= self.average_decay < 1.0,
                "average-decay",
                "a number in [0, 1) (0: release the last round's model)",
            ),
            (
                self.coordinator_eval in COORDINATOR_EVAL,
                "coordinator-eval",
                f"one of {COORDINATOR_EVAL}",
            ),
            (
                self.coordinator_eval != "on" or self.benchmark_geometry,
                "coordinator-eval",
                f"'auto' or 'off': 'on' evaluates on the built-in benchmark, whose images are "
                f"{BENCHMARK_IMAGE_SIZE} grayscale, but the run sets image-size = "
                f"'{self.image_size}' and image-channels = {self.image_channels}",
            ),
            (
                self.dp_mode == "local" or (self.secure_aggregation and self.private),
                "dp-mode",
                "'local', or 'distributed' with secure-aggregation = true and a finite epsilon",
            ),
        ]
        for ok, key, allowed in checks:
            if not ok:
                value = getattr(self, key.replace("-", "_"))
                raise ConfigError(f"run config '{key}' = {value!r} is invalid: use {allowed}")
        self._check_model_and_distractors()

    def _check_model_and_distractors(self) -> None:
        """The image and text geometry and the distractor sources; errors name the key."""
        try:
            model = model_config_from_settings(self)
            parse_word_lists(self.distractor_word_lists)
            if model.pretrained:
                encoder_specs_of(self)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if model.pretrained and self.dp_mode != "local":
            raise ConfigError(
                f"run config 'dp-mode' = {self.dp_mode!r} is not supported with pretrained "
                "encoders: use 'local' (DP-SGD at each site on its cached features)"
            )
        if self.caption_bank_sha256 and not _SHA256_HEX.fullmatch(self.caption_bank_sha256):
            raise ConfigError(
                f"run config 'caption-bank-sha256' = {self.caption_bank_sha256!r} is invalid: "
                "use the 64 lower-case hex digits sha256sum prints, or '' to take the file's"
            )
        if self.caption_bank_sha256 and not self.caption_bank:
            raise ConfigError(
                "run config 'caption-bank-sha256' is set but 'caption-bank' is not: name the "
                "caption bank file, or clear the digest"
            )

    def caption_bank_file(self) -> CaptionBank | None:
        """The run's caption bank, read from its file and checked against
        ``caption-bank-sha256`` when that is set; None when the run has none."""
        if not self.caption_bank:
            return None
        try:
            bank = CaptionBank.from_file(self.caption_bank)
        except CaptionBankError as err:
            raise ConfigError(str(err)) from None
        if self.caption_bank_sha256 and bank.sha256 != self.caption_bank_sha256:
            raise ConfigError(
                f"caption bank {self.caption_bank} has SHA-256 {bank.sha256}, but run config "
                f"'caption-bank-sha256' pins {self.caption_bank_sha256}: the file changed; "
                "restore it, or set the new digest (or '' to take the file's)"
            )
        return bank

    def with_caption_bank_digest(self) -> FederationConfig:
        """This config with ``caption-bank-sha256`` set to the bank file's digest (checked
        against a pinned one), so that the run's summary records which bank it used."""
        bank = self.caption_bank_file()
        return self if bank is None else replace(self, caption_bank_sha256=bank.sha256)

    def distractor_settings(self) -> DistractorSettings:
        """Where distractors come from in this run (``common.distractors``)."""
        from fedmm.common.distractors import DistractorSettings

        return DistractorSettings(
            word_lists=parse_word_lists(self.distractor_word_lists),
            bank=self.caption_bank_file(),
        )

    def learning_rate_in_round(self, server_round: int) -> float:
        """The learning rate of ``server_round`` (the sites' local one, or the coordinator's
        step in distributed DP); see :func:`scheduled_learning_rate`."""
        return scheduled_learning_rate(
            self.learning_rate,
            schedule=self.learning_rate_schedule,
            server_round=server_round,
            num_rounds=self.num_server_rounds,
        )

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def benchmark_geometry(self) -> bool:
        """Whether the run's images are the built-in benchmark's (28x56 grayscale)."""
        size = self.image_size.replace(" ", "").lower()
        return size == BENCHMARK_IMAGE_SIZE and self.image_channels == BENCHMARK_IMAGE_CHANNELS

    @property
    def coordinator_evaluates(self) -> bool:
        """Whether the coordinator evaluates on the benchmark's test split: ``on``, or
        ``auto`` when the run's image geometry is the benchmark's."""
        if pretrained_kind(self.model_image_encoder) is not None:
            return False  # the coordinator holds no features of the benchmark's images
        return self.coordinator_eval == "on" or (
            self.coordinator_eval == "auto" and self.benchmark_geometry
        )

    def evaluates_after(self, server_round: int) -> bool:
        """Whether the global model is evaluated after ``server_round``: every
        ``eval-every`` rounds, and after the last."""
        if server_round == self.num_server_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0

    def next_evaluation_round(self, server_round: int) -> int:
        """The round after which the model is next evaluated, after ``server_round``
        (0: none)."""
        following = range(server_round + 1, self.num_server_rounds + 1)
        return next((r for r in following if self.evaluates_after(r)), 0)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse kebab-case keys; unknown keys are an error (typos must not pass)."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(f"unknown run config key(s) {unknown}; known keys: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            field = known[key]
            kind = type(getattr(cls, field.name)) if hasattr(cls, field.name) else str
            try:
                values[field.name] = _coerce(value, kind)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"run config '{key}' = {value!r} is not a {kind.__name__}"
                ) from err
        return cls(**values).with_caption_bank_digest()

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def scheduled_learning_rate(
    base: float, *, schedule: str, server_round: int, num_rounds: int
) -> float:
    """The learning rate of ``server_round`` (1-based): ``base`` throughout (``constant``),
    or decayed by half a cosine over ``num_rounds`` (``cosine``; Loshchilov and Hutter,
    ICLR 2017, without restarts), from ``base`` in round 1 towards 0."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"learning-rate schedule must be one of {LEARNING_RATE_SCHEDULES}")
    progress = (min(server_round, num_rounds) - 1) / num_rounds
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        return float(value)
    return str(value)


def encoder_specs_of(source: Any) -> tuple[EncoderSpec, EncoderSpec]:
    """The (image, text) pretrained encoders a run's settings name (a ``FederationConfig``
    or a ``TrainRequest``); an OpenCLIP text encoder with no weights of its own takes the
    image encoder's. A FrozenWeightsError names the run-config key."""
    image = EncoderSpec.parse(
        source.model_image_encoder,
        weights=source.model_image_weights,
        sha256=source.model_image_weights_sha256,
        key="model-image-encoder",
    )
    text_weights, text_sha256 = source.model_text_weights, source.model_text_weights_sha256
    if not text_weights and source.model_text_encoder == source.model_image_encoder:
        text_weights, text_sha256 = image.weights, text_sha256 or image.sha256
    text = EncoderSpec.parse(
        source.model_text_encoder,
        weights=text_weights,
        sha256=text_sha256,
        key="model-text-encoder",
    )
    for spec in (image, text):
        if is_hub_name(spec.weights):
            parse_hub_name(spec.weights)  # the form, before any site is asked
    return image, text
