"""Which records a site trains on: its own imagefolder, or its simulated partition, after
the site's de-identification policy has been applied to them, without the records it holds
out for federated evaluation (``client.held_out_split``).

De-identification (``client.deid``) always runs, under the policy file the node config
names (``deid-policy=FILE``), else the default policy. The site secret that keys the
pseudonyms is ``site-secret=FILE`` (created on first use, 0600), by default
``~/.config/fedmm/site-secret``; the de-identified data is cached under ``deid-cache-dir=DIR``
(0700), by default ``~/.cache/fedmm/deid``. A simulated site without these settings (``flwr
run`` of the app) keeps its own secret and cache in
``~/.cache/fedmm/simulated-sites/site-<id>/``; ``fedmm simulate`` names them in each
simulated site's node config. The cache is keyed by the policy, the data's
content, the tool versions and the secret (``client.deid.cache``): de-identification runs
once per dataset version, again when any of them changes, or when an entry is older than
``deid-cache-retention-days`` (30). Every cache file is encrypted under a key derived from
the site secret; one that fails authentication is deleted and rebuilt, never used.

Records the site withdrew (``fedmm site forget``: node config ``withdrawals-file``,
``client.record_withdrawals``) are read at every load, so a running site leaves them out of
its training and held-out records from the next round on, and out of its cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmm.common.data.benchmark import CANVAS_SHAPE, benchmark_train_records
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.partitioning import partition_indices
from fedmm.common.model_config import ModelConfig
from fedmm.common.train_request import TrainRequest

if TYPE_CHECKING:  # the de-identification tools load only when used
    from fedmm.client.deid.cache import EncryptedEntry, EntryWriter
    from fedmm.client.deid.policy import DeidPolicy
    from fedmm.client.held_out_split import SiteSplit

logger = logging.getLogger(__name__)

_MEMO_SIZE = 8
#: Node config key: days a de-identification cache entry is kept (default 30).
RETENTION_DAYS = "deid-cache-retention-days"


class SiteDataError(ValueError):
    """The site's node config does not say where its data is."""


@lru_cache(maxsize=16)
def _benchmark_partition(
    data_dir: str,
    num_partitions: int,
    partition_id: int,
    scheme: str,
    alpha: float,
    seed: int,
    limit: int,
) -> ImageTextDataset:
    records = benchmark_train_records(data_dir or None)
    indices = partition_indices(
        records.labels,
        num_partitions=num_partitions,
        partition_id=partition_id,
        scheme=scheme,  # type: ignore[arg-type]
        alpha=alpha,
        seed=seed,
    )
    return records.subset(indices[:limit] if limit else indices)


@dataclass(frozen=True)
class SiteDeidSettings:
    """Where a site's de-identification policy, secret and cache are."""

    policy_file: Path | None  # None: the default DeidPolicy
    secret_file: Path
    cache_dir: Path
    #: Cache entries older than this many days are rebuilt (and ``fedmm site purge``
    #: removes them): node config ``deid-cache-retention-days``.
    retention_days: float = 30.0
    #: The site's withdrawals file (``client.record_withdrawals``); None: no withdrawals.
    withdrawals_file: Path | None = None

    def load_policy(self) -> DeidPolicy:
        """The policy in ``policy_file``, or the default policy."""
        from fedmm.client.deid.policy import DeidPolicy, load_policy

        return load_policy(self.policy_file) if self.policy_file else DeidPolicy()


def site_deid_settings(node_config: Mapping[str, Any]) -> SiteDeidSettings:
    """The site's de-identification settings.

    Every site's records are de-identified before training, with the policy file named by
    node config ``deid-policy`` (else the default policy), the secret ``site-secret`` and the
    cache ``deid-cache-dir``. A simulated site that names neither secret nor cache keeps its
    own in ``~/.cache/fedmm/simulated-sites/site-<id>/`` (so ``flwr run`` of the app
    de-identifies the benchmark's synthetic personal data too).
    """
    from fedmm.client.deid.cache import default_cache_dir
    from fedmm.client.deid.site_secret import default_site_secret_path

    policy_file = node_config.get("deid-policy")
    secret_file, cache_dir = default_site_secret_path(), default_cache_dir()
    if "partition-id" in node_config and "imagefolder" not in node_config:
        sim_dir = default_cache_dir().parent / "simulated-sites"
        site_dir = sim_dir / f"site-{node_config['partition-id']}"
        secret_file, cache_dir = site_dir / "site-secret", site_dir / "cache"
    from fedmm.client.deid.cache import DEFAULT_RETENTION_DAYS
    from fedmm.client.record_withdrawals import withdrawals_path

    retention = node_config.get(RETENTION_DAYS, DEFAULT_RETENTION_DAYS)
    try:
        retention_days = float(retention)
    except (TypeError, ValueError):
        retention_days = -1.0
    if isinstance(retention, bool) or not retention_days > 0:
        raise SiteDataError(
            f"node config {RETENTION_DAYS} = {retention!r}: use a number of days > 0 "
            "(site config [deidentification] cache-retention-days)"
        )
    return SiteDeidSettings(
        policy_file=Path(str(policy_file)) if policy_file else None,
        secret_file=Path(str(node_config.get("site-secret", secret_file))),
        cache_dir=Path(str(node_config.get("deid-cache-dir", cache_dir))),
        retention_days=retention_days,
        withdrawals_file=withdrawals_path(node_config),
    )


# In-process cache of the held-out split: (records' id, fraction, secret digest) ->
# (records, split).
_split_memo: dict[tuple[Any, ...], tuple[ImageTextDataset, SiteSplit]] = {}
# In-process cache: (what, policy, secret, cache dir) -> (raw data or folder signature, result).
_memo: OrderedDict[tuple[Any, ...], tuple[Any, ImageTextDataset]] = OrderedDict()


def _remember(key: tuple[Any, ...], check: Any, data: ImageTextDataset) -> ImageTextDataset:
    _memo[key] = (check, data)
    _memo.move_to_end(key)
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return data


def _recall(key: tuple[Any, ...], check: Any) -> ImageTextDataset | None:
    hit = _memo.get(key)
    if hit is None:
        return None
    stored, data = hit
    same = stored is check if isinstance(check, ImageTextDataset) else stored == check
    return data if same else None


def _log_built(what: str, report: Any, seconds: float, entry: Path) -> None:
    logger.info(
        "de-identified %s in %.1f s: %d of %d captions altered (%s), %d of %d images with "
        "faces; audit in %s",
        what,
        seconds,
        report.captions_altered,
        report.captions_processed,
        ", ".join(f"{k} {v}" for k, v in sorted(report.pii_by_type.items())) or "nothing found",
        report.images_with_faces,
        report.images_processed,
        entry / "audit.json",
    )


def deidentified_records(
    raw: ImageTextDataset, *, source: tuple[Any, ...], settings: SiteDeidSettings
) -> ImageTextDataset:
    """``raw`` (records in memory) de-identified under the site's policy, from the cache when
    this policy, secret and tool set have seen the same records before."""
    import io

    import numpy as np

    from fedmm.client.deid.audit import tool_versions
    from fedmm.client.deid.cache import (
        DeidCache,
        cache_key,
        records_digest,
        secret_fingerprint,
        slot_name,
    )
    from fedmm.client.deid.face_detection import build_face_detector
    from fedmm.client.deid.records import deidentify_records
    from fedmm.client.deid.site_secret import load_or_create_site_secret
    from fedmm.client.encrypted_cache import CacheIntegrityError

    policy = settings.load_policy()
    secret = load_or_create_site_secret(settings.secret_file)
    memo_key = ("records", source, policy, secret_fingerprint(secret), settings.cache_dir)
    hit = _recall(memo_key, raw)
    if hit is not None:
        return hit
    detector = build_face_detector(policy.face_detectors, min_face_size=policy.min_face_size)
    versions = tool_versions(detector.versions())
    cache = DeidCache(settings.cache_dir, secret, retention_days=settings.retention_days)
    slot = slot_name(("records", *source), secret)
    key = cache_key(
        policy=policy, content_digest=records_digest(raw, secret), versions=versions, secret=secret
    )
    entry = cache.lookup(slot, key)
    if entry is not None:
        try:
            with np.load(io.BytesIO(entry["records.npz"]), allow_pickle=False) as arrays:
                images, labels = arrays["images"], arrays["labels"]
            captions = json.loads(entry["captions.json"].decode("utf-8"))
            return _remember(
                memo_key, raw, ImageTextDataset(images=images, captions=captions, labels=labels)
            )
        except CacheIntegrityError as error:
            cache.reject(entry.path, error)
        except (OSError, ValueError, KeyError):
            logger.warning(
                "unreadable de-identification cache entry %s: rebuilding", entry.path.name
            )
            cache.discard(slot, key)
    started = time.monotonic()
    data, report = deidentify_records(raw, policy, secret, detector=detector)

    def build(writer: EntryWriter) -> None:
        arrays = io.BytesIO()
        np.savez(arrays, images=data.images, labels=data.labels)
        writer.add("records.npz", arrays.getvalue())
        writer.add("captions.json", json.dumps(data.captions, ensure_ascii=False).encode())
        writer.add("audit.json", json.dumps(report.to_dict(), sort_keys=True).encode())

    stored = cache.store(
        slot, key, build, description={"policy": policy.to_dict(), "tool_versions": versions}
    )
    _log_built(f"{len(raw)} records", report, time.monotonic() - started, stored.path)
    return _remember(memo_key, raw, data)


@dataclass(frozen=True)
class ImageGeometry:
    """How a site's images are loaded: the model's size and channels, and the caption length
    it reads (longer captions are counted in the load report)."""

    image_size: tuple[int, int] = CANVAS_SHAPE
    channels: int = 1
    caption_words: int | None = None

    @classmethod
    def of_model(cls, config: ModelConfig) -> ImageGeometry:
        return cls(config.image_size, config.image_channels, config.max_len)


def deidentified_imagefolder(
    root: Path, *, settings: SiteDeidSettings, geometry: ImageGeometry | None = None
) -> ImageTextDataset:
    """The site's imagefolder de-identified at full resolution (faces are found before the
    images are scaled down), then loaded at the model's ``geometry``; cached like
    :func:`deidentified_records`, encrypted. Records withdrawn at the site
    (``client.record_withdrawals``) are left out of what is loaded and removed from the
    cache entry; a rebuilt entry never stores them."""
    from fedmm.client.deid.cache import DeidCache, folder_signature, secret_fingerprint
    from fedmm.client.deid.imagefolder import deidentify_imagefolder
    from fedmm.client.deid.site_secret import load_or_create_site_secret
    from fedmm.client.encrypted_cache import CacheIntegrityError
    from fedmm.client.record_withdrawals import withdrawal_key, withdrawn_digests

    geometry = geometry or ImageGeometry()
    root = Path(root).resolve()
    cache_dir = settings.cache_dir.resolve()
    if cache_dir == root or root in cache_dir.parents:
        raise SiteDataError(
            f"the de-identification cache {settings.cache_dir} is inside the site's data "
            f"{root}: set deid-cache-dir to a folder outside it"
        )
    policy = settings.load_policy()
    secret = load_or_create_site_secret(settings.secret_file)
    withdrawn = withdrawn_digests(settings.withdrawals_file, secret)
    memo_key = (
        "imagefolder",
        str(root),
        geometry,
        policy,
        secret_fingerprint(secret),
        settings.cache_dir,
    )
    # A new withdrawal changes the check: the next load (the next round) drops the record.
    signature = (folder_signature(root), withdrawn)
    hit = _recall(memo_key, signature)
    if hit is not None:
        return hit
    cache = DeidCache(settings.cache_dir, secret, retention_days=settings.retention_days)
    slot, key, versions = imagefolder_cache_address(root, policy=policy, secret=secret)
    record_key = withdrawal_key(secret)
    entry = cache.lookup(slot, key)
    if entry is not None:
        try:
            data = _load_entry(entry, withdrawn, record_key, geometry)
            return _remember(memo_key, signature, data)
        except CacheIntegrityError as error:
            cache.reject(entry.path, error)
        except (OSError, ValueError):
            logger.warning(
                "unreadable de-identification cache entry %s: rebuilding", entry.path.name
            )
            cache.discard(slot, key)
    started = time.monotonic()
    reports = []

    def build(writer: EntryWriter) -> None:
        from fedmm.client.record_withdrawals import (
            METADATA_FILE,
            record_digest,
            without_withdrawn_lines,
        )

        def keep(name: str, content: bytes) -> None:
            if name == METADATA_FILE:
                content = without_withdrawn_lines(content, withdrawn, record_key)
            elif record_digest(name, record_key) in withdrawn:
                return  # a withdrawn record's image is never stored
            writer.add(name, content)

        report = deidentify_imagefolder(root, Path("-"), policy, secret, sink=keep)
        writer.add("audit.json", json.dumps(report.to_dict(), sort_keys=True).encode())
        reports.append(report)

    stored = cache.store(
        slot, key, build, description={"policy": policy.to_dict(), "tool_versions": versions}
    )
    if reports:
        _log_built(str(root), reports[0], time.monotonic() - started, stored.path)
    data = _load_entry(stored, withdrawn, record_key, geometry)
    return _remember(memo_key, signature, data)


def imagefolder_cache_address(
    root: Path, *, policy: DeidPolicy, secret: bytes
) -> tuple[str, str, dict[str, str]]:
    """The cache slot and key of the imagefolder ``root`` (resolved) de-identified under
    ``policy`` and ``secret`` by the installed tools, and those tools' versions."""
    from fedmm.client.deid.audit import tool_versions
    from fedmm.client.deid.cache import cache_key, folder_digest, slot_name
    from fedmm.client.deid.face_detection import build_face_detector

    detector = build_face_detector(policy.face_detectors, min_face_size=policy.min_face_size)
    versions = tool_versions(detector.versions())
    slot = slot_name(("imagefolder", str(root)), secret)
    key = cache_key(
        policy=policy, content_digest=folder_digest(root, secret), versions=versions, secret=secret
    )
    return slot, key, versions


def remove_withdrawn_from_entry(
    entry: EncryptedEntry, withdrawn: frozenset[str], record_key: bytes
) -> int:
    """Remove the withdrawn records from a cache entry: their lines from its
    ``metadata.jsonl`` and their images. Returns how many records were removed."""
    from fedmm.client.record_withdrawals import (
        METADATA_FILE,
        metadata_file_names,
        withdrawn_files,
        without_withdrawn_lines,
    )

    if not withdrawn or METADATA_FILE not in entry:
        return 0
    metadata = entry[METADATA_FILE]
    lines = withdrawn_files(metadata_file_names(metadata), withdrawn, record_key)
    images = withdrawn_files([n for n in entry if n != METADATA_FILE], withdrawn, record_key)
    if lines:
        entry.replace(METADATA_FILE, without_withdrawn_lines(metadata, withdrawn, record_key))
    entry.remove(images)
    removed = len(set(lines) | set(images))
    if removed:
        logger.info(
            "%d withdrawn record(s) removed from the de-identification cache entry %s",
            removed,
            entry.path.name,
        )
    return removed


def _load_entry(
    entry: EncryptedEntry, withdrawn: frozenset[str], record_key: bytes, geometry: ImageGeometry
) -> ImageTextDataset:
    """The de-identified imagefolder in ``entry``, decrypted in memory and loaded at
    ``geometry``, without withdrawn records, which are removed from the entry first."""
    from fedmm.common.data.imagefolder import load_imagefolder_files

    remove_withdrawn_from_entry(entry, withdrawn, record_key)
    data, _report = load_imagefolder_files(
        entry,
        name=f"de-identified cache entry {entry.path.name}",
        image_size=geometry.image_size,
        channels=geometry.channels,
        caption_words=geometry.caption_words,
    )
    return data


def load_site_records(node_config: Mapping[str, Any], request: TrainRequest) -> ImageTextDataset:
    """All of a site's records, de-identified under the site's policy (before the held-out
    split: :func:`load_site_split`).

    ``imagefolder`` in the node config: the site's own folder (deployment), loaded at the
    run's ``image-size`` and ``image-channels``. Otherwise ``partition-id`` and
    ``num-partitions`` (set by Flower's simulation): that partition of the built-in
    benchmark (its first ``site-records-limit`` records when that is set), whose images are
    28x56 grayscale; the node config's ``data-dir`` wins over the run's.
    """
    settings = site_deid_settings(node_config)
    model = request.model_config()
    if "imagefolder" in node_config:
        return deidentified_imagefolder(
            Path(str(node_config["imagefolder"])),
            settings=settings,
            geometry=ImageGeometry.of_model(model),
        )
    if "partition-id" in node_config and "num-partitions" in node_config:
        if model.record_image_shape != CANVAS_SHAPE:
            raise SiteDataError(
                f"the built-in benchmark's images are {CANVAS_SHAPE[0]}x{CANVAS_SHAPE[1]} "
                f"grayscale, but the run asks for image-size = '{request.image_size}' and "
                f"image-channels = {request.image_channels}: set image-size = '28x56' and "
                "image-channels = 1, or give the site an imagefolder (node config imagefolder)"
            )
        params = (
            str(node_config.get("data-dir", request.data_dir)),
            int(node_config["num-partitions"]),
            int(node_config["partition-id"]),
            request.partition,
            float(request.dirichlet_alpha),
            int(request.seed),
            int(request.site_records_limit),
        )
        raw = _benchmark_partition(*params)
        return deidentified_records(raw, source=("benchmark", *params), settings=settings)
    raise SiteDataError(
        "node config names no data: set imagefolder=PATH (a folder with metadata.jsonl) "
        "or, in simulation, partition-id and num-partitions"
    )


def load_site_split(node_config: Mapping[str, Any], request: TrainRequest) -> SiteSplit:
    """The site's records split into training and held-out records by the keyed hash of
    ``client.held_out_split`` (the site secret, the request's ``eval_fraction``). With a
    scattering image encoder, the features of all the records are computed once and cached
    (``client.scattering_cache``)."""
    from fedmm.client.deid.site_secret import load_or_create_site_secret
    from fedmm.client.held_out_split import split_records
    from fedmm.client.scattering_cache import warm_scattering_features

    records = load_site_records(node_config, request)
    secret = load_or_create_site_secret(site_deid_settings(node_config).secret_file)
    fraction = float(request.eval_fraction)
    key = (id(records), fraction, hashlib.sha256(secret).digest())
    hit = _split_memo.get(key)
    if hit is not None and hit[0] is records:
        return hit[1]
    split = split_records(records, site_secret=secret, fraction=fraction)
    settings = site_deid_settings(node_config)
    warm_scattering_features(
        records,
        config=request.model_config(),
        cache_dir=settings.cache_dir,
        secret=secret,
        retention_days=settings.retention_days,
    )
    _split_memo[key] = (records, split)
    while len(_split_memo) > _MEMO_SIZE:
        _split_memo.pop(next(iter(_split_memo)))
    return split


def load_site_data(node_config: Mapping[str, Any], request: TrainRequest) -> ImageTextDataset:
    """A site's training records: its de-identified records (:func:`load_site_records`)
    without the held-out ones, which no training batch, record count or sampling rate ever
    sees (:func:`load_site_split`)."""
    return load_site_split(node_config, request).train
