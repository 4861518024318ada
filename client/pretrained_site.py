"""A site's side of a run with frozen pretrained encoders: its weights, checked, and its
records' features, cached.

The run names each encoder's weights with their SHA-256 (``common.pretrained``). A site
loads its own copy: at the run's path, or, when its node config sets
``pretrained-weights-dir``, the file or directory of the same name there (for a hub name
``hf-hub:<org>/<name>``: ``<name>`` there if it has it, else the site resolves the name
itself, ``common.pretrained.hub_weights``). It refuses the
round (``frozen-weights``) when its copy is missing or its digest is not the run's, before
anything is computed: features of other weights would train a head that fits no one's. Its
de-identified records (``client.site_data``) then go through the encoders once, and the
features are cached beside them (``client.feature_cache``); the training records' features
train, the held-out records' features evaluate (the keyed split of
``client.held_out_split``, the same one the built-in model uses).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmm.client.feature_cache import SiteFeatures, cached_site_features
from fedmm.client.site_data import load_site_records, site_deid_settings
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.federation_config import encoder_specs_of
from fedmm.common.model_config import ModelConfig
from fedmm.common.pretrained.encoder_spec import (
    EncoderSpec,
    FrozenWeightsError,
    site_weights_path,
)
from fedmm.common.pretrained.hub_weights import is_hub_name, site_copy_of_hub_weights
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.common.train_request import TrainRequest

logger = logging.getLogger(__name__)

#: Node config key: the folder holding the site's copies of frozen weights.
PRETRAINED_WEIGHTS_DIR = "pretrained-weights-dir"


@dataclass(frozen=True)
class PretrainedSiteData:
    """The model config resolved against the site's encoders, and its records' features."""

    config: ModelConfig
    train: SiteFeatures
    held_out: SiteFeatures
    train_records: ImageTextDataset  # for the record count and the distractor checks
    encoders: Any = None  # FrozenEncoders: the adapted blocks' frozen weights come from them


def site_encoder_specs(
    node_config: Mapping[str, Any], request: TrainRequest
) -> tuple[EncoderSpec, EncoderSpec]:
    """The run's encoders with the site's own weight paths."""
    image, text = encoder_specs_of(request)
    weights_dir = node_config.get(PRETRAINED_WEIGHTS_DIR)
    folder = str(weights_dir) if weights_dir else None
    return image.at(_site_weights(image.weights, folder)), text.at(
        _site_weights(text.weights, folder)
    )


def _site_weights(run_weights: str, folder: str | None) -> str:
    """A local path: the site's copy in ``folder``; a hub name: the site's copy in
    ``folder`` when it has one, else the name (resolved by the site itself)."""
    if is_hub_name(run_weights):
        return site_copy_of_hub_weights(run_weights, folder)
    return site_weights_path(run_weights, folder)


def _data_source(node_config: Mapping[str, Any]) -> tuple[Any, ...]:
    if "imagefolder" in node_config:
        return ("imagefolder", str(Path(str(node_config["imagefolder"])).resolve()))
    return (
        "benchmark",
        str(node_config.get("partition-id")),
        str(node_config.get("num-partitions")),
    )


_memo: dict[tuple[Any, ...], tuple[ImageTextDataset, PretrainedSiteData]] = {}


def load_pretrained_site(
    node_config: Mapping[str, Any], request: TrainRequest
) -> PretrainedSiteData | SiteRefusal:
    """The site's features for ``request``'s encoders, or a refusal: ``frozen-weights``
    when its copy of the weights is missing or differs from the run's pin, ``bad-request``
    when the request's encoders or image size cannot be used, ``site-error`` when the
    optional libraries are missing. Details stay in the site's log."""
    from fedmm.client.deid.site_secret import load_or_create_site_secret
    from fedmm.client.held_out_split import held_out_mask
    from fedmm.common.pretrained.frozen_encoders import (
        PretrainedLibraryMissing,
        load_frozen_encoders,
        resolve_model_config,
    )

    try:
        specs = site_encoder_specs(node_config, request)
    except FrozenWeightsError as error:
        return SiteRefusal(RefusalCode.BAD_REQUEST, str(error))
    try:
        encoders = load_frozen_encoders(*specs)
    except FrozenWeightsError as error:
        return SiteRefusal(RefusalCode.FROZEN_WEIGHTS, str(error))
    except PretrainedLibraryMissing as error:
        return SiteRefusal(RefusalCode.SITE_ERROR, str(error))
    try:
        config = resolve_model_config(request.model_config(), encoders)
    except ValueError as error:
        return SiteRefusal(RefusalCode.BAD_REQUEST, str(error))
    records = load_site_records(node_config, request)
    settings = site_deid_settings(node_config)
    secret = load_or_create_site_secret(settings.secret_file)
    try:
        distractors = request.distractor_settings()
    except ValueError as error:  # CaptionBankError: the bank does not match its digest
        return SiteRefusal(RefusalCode.BAD_REQUEST, f"distractors: {error}")
    memo_key = (
        id(records),
        config,
        distractors,
        int(request.num_distractors),
        float(request.eval_fraction),
        settings.cache_dir,
    )
    hit = _memo.get(memo_key)
    if hit is not None and hit[0] is records:
        return hit[1]
    try:  # the caption bank's digest and every caption's distractors, before any spend
        cached = cached_site_features(
            records,
            encoders,
            config=config,
            settings=distractors,
            num_distractors=int(request.num_distractors),
            cache_dir=settings.cache_dir,
            secret=secret,
            source=_data_source(node_config),
            retention_days=settings.retention_days,
        )
    except ValueError as error:  # CaptionBankError, DistractorError
        return SiteRefusal(RefusalCode.BAD_REQUEST, f"distractors: {error}")
    held_out = held_out_mask(records, site_secret=secret, fraction=float(request.eval_fraction))
    train_indices, held_out_indices = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    site = PretrainedSiteData(
        config=config,
        train=cached.features.subset(train_indices),
        held_out=cached.features.subset(held_out_indices),
        train_records=records.subset(train_indices),
        encoders=encoders,
    )
    _memo[memo_key] = (records, site)
    while len(_memo) > 16:
        _memo.pop(next(iter(_memo)))
    return site
