"""Frozen-encoder features of a site's records, computed once and cached beside its
de-identified data.

With frozen pretrained encoders (``common.pretrained``) a round trains only the fusion head,
so each record's features are computed once, after de-identification (the encoders only
ever see de-identified records), and kept in the de-identification cache's folder under
``features/`` (mode 0700, ``client.deid.cache.DeidCache``: entries written whole and renamed
into place; a new entry of a dataset removes its older ones). Features are derived personal
data: like the de-identified copy, every file is encrypted at rest (AES-256-GCM under a key
derived from the site secret, bound to its entry: ``client.encrypted_cache``); an entry that
fails authentication, or is past the site's retention period, is discarded and rebuilt,
never used.

An entry holds, for every de-identified record: its image tokens, and the token states of
its caption and of a pool of public distractor captions (``POOL_DRAWS`` draws of the
training loss's candidates, ``common.distractors``: word swaps of its own caption and caption
bank lines, never another record's caption). Each distinct caption is encoded once. A round
samples a record's ``K`` distractors from its pool; the held-out records' features serve
federated evaluation.

With LoRA adapters on an encoder's last N blocks (``model-lora-blocks``), its entries hold
the hidden states entering the first adapted block instead of its output tokens: a round
runs only the adapted blocks and the fusion head (``common.pretrained.lora_adapters``).

The entry's key is an HMAC under the site secret of the frozen weights' digests, both
encoders' preprocessing and tokenizer (the model config records them), the number of
adapted blocks of each encoder (when not 0), the distractor
sources, the cache format and this module's code, and a keyed digest of the records'
content: change any of them and the features are rebuilt; change nothing and they are
reused. Arrays are read and written by one pair of functions, :func:`write_feature_arrays`
and :func:`read_feature_arrays` (safetensors bytes, no pickle, encrypted by the entry).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedmm.client.deid.cache import (
    DEFAULT_RETENTION_DAYS,
    DeidCache,
    EncryptedEntry,
    EntryWriter,
    records_digest,
    slot_name,
)
from fedmm.client.encrypted_cache import CacheIntegrityError
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.distractors import DistractorSampler, DistractorSettings
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Bump when the layout or meaning of an entry changes.
FEATURE_CACHE_FORMAT = 1
#: Candidate draws per record whose distinct distractors form its pool.
POOL_DRAWS = 2
ARRAYS_FILE = "features.safetensors"
#: The folder of feature entries inside the de-identification cache.
FEATURES_DIR = "features"


@dataclass(frozen=True)
class SiteFeatures:
    """Frozen features of records: image tokens per record; caption token states in one
    table of distinct captions, which each record's own caption and distractor pool index."""

    image: np.ndarray  # (N, P, D_image) float16
    text: np.ndarray  # (U, T, D_text) float16
    text_valid: np.ndarray  # (U, T) bool
    caption_row: np.ndarray  # (N,) int64: the record's caption in ``text``
    distractor_rows: np.ndarray  # (N, M) int64: its distractor pool, -1 where shorter

    def __len__(self) -> int:
        return len(self.caption_row)

    def subset(self, indices: np.ndarray) -> SiteFeatures:
        """The records at ``indices`` (the caption table is shared)."""
        indices = np.asarray(indices, dtype=np.int64)
        return SiteFeatures(
            image=self.image[indices],
            text=self.text,
            text_valid=self.text_valid,
            caption_row=self.caption_row[indices],
            distractor_rows=self.distractor_rows[indices],
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "image": self.image,
            "text": self.text,
            "text_valid": self.text_valid.astype(np.uint8),
            "caption_row": self.caption_row,
            "distractor_rows": self.distractor_rows,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SiteFeatures:
        return cls(
            image=arrays["image"],
            text=arrays["text"],
            text_valid=arrays["text_valid"].astype(bool),
            caption_row=arrays["caption_row"].astype(np.int64),
            distractor_rows=arrays["distractor_rows"].astype(np.int64),
        )


def write_feature_arrays(writer: EntryWriter, arrays: dict[str, np.ndarray]) -> None:
    """Store an entry's arrays (the cache's one writer): safetensors bytes, encrypted by
    the entry as they are added."""
    from safetensors.numpy import save

    writer.add(ARRAYS_FILE, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def read_feature_arrays(entry: EncryptedEntry) -> dict[str, np.ndarray]:
    """The arrays :func:`write_feature_arrays` stored in ``entry`` (its one reader);
    ``CacheIntegrityError`` when the file fails authentication."""
    from safetensors.numpy import load

    return load(entry[ARRAYS_FILE])


def entry_key(secret: bytes, label: bytes, material: dict[str, Any]) -> str:
    """A cache entry's key: HMAC-SHA256 under the site secret of ``label`` (which cache)
    and the canonical JSON of ``material`` (what the entry was built from), 40 hex digits."""
    import hmac
    import json

    text = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret, label + b"\x00" + text, hashlib.sha256).hexdigest()[:40]


def read_cached_entry(
    cache: DeidCache, slot: str, key: str, decode: Callable[[dict[str, np.ndarray]], T]
) -> tuple[T, Path] | None:
    """``decode`` of the arrays of the entry ``(slot, key)`` and its path, or None when the
    caller must build it: no entry, one that fails authentication (rejected), or one that
    cannot be read or decoded (discarded)."""
    entry = cache.lookup(slot, key)
    if entry is None:
        return None
    try:
        return decode(read_feature_arrays(entry)), entry.path
    except CacheIntegrityError as error:
        cache.reject(entry.path, error)
    except (OSError, KeyError, ValueError):
        logger.warning("unreadable cache entry %s: rebuilding", entry.path.name)
        cache.discard(slot, key)
    return None


def distractor_pools(
    captions: list[str],
    *,
    settings: DistractorSettings,
    tokenizer: HashingTokenizer,
    num_distractors: int,
    rng: np.random.Generator,
) -> list[list[str]]:
    """Each caption's distinct distractors over ``POOL_DRAWS`` draws of its candidates."""
    sampler = DistractorSampler(settings, tokenizer=tokenizer, num_distractors=num_distractors)
    pools = []
    for caption in captions:
        pool: dict[str, None] = {}
        for _ in range(POOL_DRAWS):
            pool.update(dict.fromkeys(sampler.candidate_captions(caption, rng)[1:]))
        pools.append(list(pool))
    return pools


def compute_site_features(
    records: ImageTextDataset,
    encoders: Any,
    *,
    config: ModelConfig,
    settings: DistractorSettings,
    num_distractors: int,
    rng: np.random.Generator,
) -> SiteFeatures:
    """Features of ``records`` with ``encoders`` (``FrozenEncoders``): image tokens, and the
    token states of every distinct caption among the records' own and their pools. An
    encoder with LoRA adapters on its last N blocks gives the hidden states entering the
    first of them instead (``common.pretrained.encoder_blocks``)."""
    pools = distractor_pools(
        list(records.captions),
        settings=settings,
        tokenizer=HashingTokenizer.for_model(config),
        num_distractors=num_distractors,
        rng=rng,
    )
    table, caption_row, distractor_rows = caption_table(list(records.captions), pools)
    from fedmm.common.pretrained.encoder_blocks import (
        block_input_image_encoder,
        block_input_text_encoder,
    )

    image_encoder = block_input_image_encoder(encoders.image, config.image_lora_blocks)
    text_encoder = block_input_text_encoder(encoders.text, config.text_lora_blocks)
    image = image_encoder.features(records.images)
    text, valid = text_encoder.features(table, config.max_len)
    return SiteFeatures(
        image=image.numpy().astype(np.float16),
        text=text.numpy().astype(np.float16),
        text_valid=valid.numpy(),
        caption_row=caption_row,
        distractor_rows=distractor_rows,
    )


def caption_table(
    captions: list[str], pools: list[list[str]]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The distinct captions among the records' own and their pools, each record's caption
    row ``(N,)`` and its pool's rows ``(N, M)`` (-1 where a pool is shorter)."""
    table: dict[str, int] = {}
    for caption, pool in zip(captions, pools, strict=True):
        for text in (caption, *pool):
            table.setdefault(text, len(table))
    width = max((len(pool) for pool in pools), default=0)
    distractor_rows = np.full((len(captions), width), -1, dtype=np.int64)
    for index, pool in enumerate(pools):
        distractor_rows[index, : len(pool)] = [table[text] for text in pool]
    caption_row = np.array([table[c] for c in captions], dtype=np.int64)
    return list(table), caption_row, distractor_rows


def feature_key_material(
    *, config: ModelConfig, settings: DistractorSettings, num_distractors: int
) -> dict[str, Any]:
    """What the features depend on besides the records (module docstring)."""
    return {
        "format": FEATURE_CACHE_FORMAT,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "pool_draws": POOL_DRAWS,
        "image_encoder": config.image_encoder,
        "text_encoder": config.text_encoder,
        "image_weights_sha256": config.image_weights_sha256,
        "text_weights_sha256": config.text_weights_sha256,
        "image_preprocessing": config.image_preprocessing,
        "text_tokenizer": config.text_tokenizer,
        "image_size": list(config.image_size),
        "word_lists": list(settings.word_lists),
        "caption_bank_sha256": settings.bank.sha256 if settings.bank else "",
        "num_distractors": num_distractors,
        # LoRA: the states entering the first adapted block (absent: frozen, as before)
        **{
            f"{side}_lora_blocks": blocks
            for side, blocks in (
                ("image", config.image_lora_blocks),
                ("text", config.text_lora_blocks),
            )
            if blocks
        },
    }


@dataclass(frozen=True)
class CachedFeatures:
    features: SiteFeatures
    built: bool  # computed now (False: read from the cache)
    entry: Path


def cached_site_features(
    records: ImageTextDataset,
    encoders: Any,
    *,
    config: ModelConfig,
    settings: DistractorSettings,
    num_distractors: int,
    cache_dir: Path,
    secret: bytes,
    source: tuple[Any, ...],
    retention_days: float = DEFAULT_RETENTION_DAYS,
) -> CachedFeatures:
    """The features of ``records`` (a site's de-identified records, from ``source``) from
    the cache under ``cache_dir/features``, or computed and stored there."""
    material = feature_key_material(
        config=config, settings=settings, num_distractors=num_distractors
    )
    material["records"] = records_digest(records, secret)
    key = entry_key(secret, b"fedmm feature cache: key", material)
    cache = DeidCache(Path(cache_dir) / FEATURES_DIR, secret, retention_days=retention_days)
    slot = slot_name(("features", *source), secret)
    found = read_cached_entry(cache, slot, key, SiteFeatures.from_arrays)
    if found is not None:
        return CachedFeatures(found[0], built=False, entry=found[1])
    started = time.monotonic()
    # the pools' draws: public captions, chosen with the site's own randomness
    rng = np.random.default_rng(secrets.randbits(128))
    features = compute_site_features(
        records,
        encoders,
        config=config,
        settings=settings,
        num_distractors=num_distractors,
        rng=rng,
    )
    entry = cache.store(
        slot,
        key,
        lambda writer: write_feature_arrays(writer, features.to_arrays()),
        description={"kind": "frozen-encoder features", **{k: material[k] for k in _PUBLIC}},
    )
    logger.info(
        "features of %d records computed in %.1f s (%s, %s), cached in %s",
        len(records),
        time.monotonic() - started,
        config.image_encoder,
        config.text_encoder,
        entry.path.name,
    )
    return CachedFeatures(features, built=True, entry=entry.path)


#: Key material written to an entry's description (nothing found in the data).
_PUBLIC = ("image_encoder", "text_encoder", "image_weights_sha256", "text_weights_sha256")
