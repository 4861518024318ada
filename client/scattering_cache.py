"""Scattering features of a site's records, computed once and kept encrypted beside its
de-identified data.

The ``scatter`` and ``scatter-linear`` image encoders start from a fixed scattering transform
(``common.scattering``) that costs more per image than the DP-SGD step on top of it. Computed
lazily per batch, every process that trains a site pays it again: each simulation actor for
every site it is handed, a deployed site for every new process. So when a site loads its
records for a run with such an encoder, :func:`warm_scattering_features` computes the
features of all of them at once (train and held-out: federated evaluation needs them too) and
stores them in the de-identification cache's ``features/`` folder, like frozen pretrained
features (``client.feature_cache``): one entry, encrypted at rest under a key derived from
the site secret (``client.encrypted_cache``), written whole and renamed into place, an entry
that fails authentication discarded and rebuilt. The next process reads the entry back into
the scattering memo instead of transforming again.

The entry's key is an HMAC under the site secret of a keyed digest of the records, the image
geometry, the code of the transform and of this module and kymatio's version: change any of
them and the features are rebuilt, and storing the new entry removes the older ones of the
site (a withdrawn record's features go with the entry that held it). Features are derived
personal data: they stay at the site like the de-identified copy.
"""

from __future__ import annotations

import hashlib
import logging
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from fedmm.client.deid.cache import DeidCache, records_digest, slot_name
from fedmm.client.feature_cache import (
    FEATURES_DIR,
    entry_key,
    read_cached_entry,
    write_feature_arrays,
)
from fedmm.common import scattering
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.model import unit_images
from fedmm.common.model_config import SCATTER_ENCODERS, ModelConfig

logger = logging.getLogger(__name__)

#: Bump when the layout or meaning of an entry changes.
SCATTERING_CACHE_FORMAT = 1
#: Images transformed at a time (bounds the transform's working memory).
CHUNK = 1024
_ARRAY = "scattering"


def _entry_key(records: ImageTextDataset, config: ModelConfig, secret: bytes) -> str:
    material = {
        "format": SCATTERING_CACHE_FORMAT,
        "code": [
            hashlib.sha256(Path(module).read_bytes()).hexdigest()
            for module in (scattering.__file__, __file__)
        ],
        "kymatio": version("kymatio"),
        "image_size": list(config.image_size),
        "image_channels": config.image_channels,
        "records": records_digest(records, secret),
    }
    return entry_key(secret, b"fedmm scattering cache: key", material)


def _transform_all(images: torch.Tensor) -> torch.Tensor:
    parts = [
        scattering.scattering_features(images[start : start + CHUNK])
        for start in range(0, len(images), CHUNK)
    ]
    return torch.cat(parts)


def warm_scattering_features(
    records: ImageTextDataset,
    *,
    config: ModelConfig,
    cache_dir: Path,
    secret: bytes,
    retention_days: float,
) -> bool | None:
    """Make the scattering features of every record of ``records`` (a site's de-identified
    records) available in this process's memo: already there (returns None), read from the
    site's cache (False) or computed now and cached (True). A model without a scattering
    encoder needs none (None)."""
    if config.image_encoder not in SCATTER_ENCODERS or len(records) == 0:
        return None
    images = unit_images(torch.from_numpy(records.images), config)
    if scattering.memoised(images):
        return None
    cache = DeidCache(Path(cache_dir) / FEATURES_DIR, secret, retention_days=retention_days)
    slot = slot_name(("scattering", *config.image_size, config.image_channels), secret)
    key = _entry_key(records, config, secret)

    def remember(arrays: dict[str, np.ndarray]) -> None:
        scattering.remember_scattering_features(images, torch.from_numpy(arrays[_ARRAY]))

    if read_cached_entry(cache, slot, key, remember) is not None:
        return False
    started = time.monotonic()
    features = _transform_all(images).numpy()
    stored_at = cache.store(
        slot,
        key,
        lambda writer: write_feature_arrays(writer, {_ARRAY: np.ascontiguousarray(features)}),
        description={"kind": "scattering features", "image_encoder": config.image_encoder},
    )
    logger.info(
        "scattering features of %d records computed in %.1f s, cached in %s",
        len(records),
        time.monotonic() - started,
        stored_at.path.name,
    )
    return True
