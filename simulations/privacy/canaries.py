"""Canaries for the one-run audit (``one_run_audit``), inserted at the sites of a federated run.

A canary is a benchmark item that no site trains on otherwise (from the part of a partition
beyond the sweep's ``records_per_site`` cap, ``membership_split``), captioned with the
evaluation caption of a *wrong* class ("a photo of a sneaker" under a coat): the model can
only fit it by memorising that record, which makes it the input-space canary of Steinke,
Nasr and Jagielski (NeurIPS 2023, Sec. 6: mislabelled examples). Canary ``i`` belongs to site
``i mod sites`` and is included in that site's data independently with probability 1/2, by
a keyed bit: the first bit of HMAC-SHA256(key, "canary-inclusion" || i) with a 32-byte key
from ``os.urandom`` (kept in the point's folder, file mode 0600, so the audit can be scored
again; it is not a secret of any site).

The sites read their records as imagefolders (``fedmm simulate --site-data``, the same path a
deployed site's own folder takes, de-identified under the site's policy): site ``k``'s folder
holds its usual ``P_k[:records_per_site]`` benchmark records and its included canaries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedmm.common.data.captions import CLASS_NAMES, canonical_caption
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.imagefolder import METADATA_FILE
from fedmm.common.data.partitioning import PartitionScheme, partition_indices

KEY_FILE = "canary-key"
CANARIES_FILE = "canaries.json"
SITES_DIR = "site-data"


def load_or_create_key(path: Path) -> bytes:
    """The 32-byte inclusion key in ``path`` (created with mode 0600 when absent)."""
    if path.exists():
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path} must hold 32 bytes, holds {len(key)}: remove it")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    key = os.urandom(32)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key


def inclusion_bits(key: bytes, count: int) -> np.ndarray:
    """``count`` independent fair bits (bool), canary ``i``'s from HMAC-SHA256(key, i)."""
    return np.array(
        [
            hmac.new(key, b"canary-inclusion" + i.to_bytes(8, "big"), hashlib.sha256).digest()[0]
            & 1
            for i in range(count)
        ],
        dtype=bool,
    )


@dataclass(frozen=True)
class CanarySet:
    """The canaries (raw records, wrong captions), their sites and whether each is in."""

    records: ImageTextDataset
    source_indices: np.ndarray  # into the benchmark's training records
    sites: np.ndarray
    included: np.ndarray


def draw_canaries(
    records: ImageTextDataset,
    *,
    count: int,
    num_sites: int,
    scheme: PartitionScheme,
    alpha: float,
    partition_seed: int,
    records_per_site: int,
    key: bytes,
    seed: int = 0,
) -> CanarySet:
    """``count`` canaries from the benchmark records no site trains on, with wrong captions.

    Only single-item records are used (their label names the one item shown); the wrong
    class is uniform over the nine others (drawn with ``seed``, independent of inclusion).
    """
    if count < 2 or num_sites < 1:
        raise ValueError(f"need at least 2 canaries and 1 site, got {count} and {num_sites}")
    held_out = np.concatenate(
        [
            partition_indices(
                records.labels,
                num_partitions=num_sites,
                partition_id=site,
                scheme=scheme,
                alpha=alpha,
                seed=partition_seed,
            )[records_per_site:]
            for site in range(num_sites)
        ]
    )
    held_out = np.sort(held_out)
    single = held_out[~_is_scene(records, held_out)]
    if len(single) < count:
        raise ValueError(
            f"only {len(single)} held-out single-item records for {count} canaries: lower "
            "--audit-canaries or records-per-site"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(single, size=count, replace=False))
    labels = records.labels[chosen]
    wrong = (labels + rng.integers(1, len(CLASS_NAMES), size=count)) % len(CLASS_NAMES)
    canaries = ImageTextDataset(
        images=records.images[chosen],
        captions=[canonical_caption(int(w)) for w in wrong],
        labels=labels.astype(np.int64),
    )
    return CanarySet(
        records=canaries,
        source_indices=chosen,
        sites=np.arange(count) % num_sites,
        included=inclusion_bits(key, count),
    )


def _is_scene(records: ImageTextDataset, indices: np.ndarray) -> np.ndarray:
    """Whether each record is a two-item scene (an item in each half of the canvas)."""
    images = records.images[indices]
    left = images[:, :, :14].reshape(len(indices), -1).max(axis=1) > 0
    right = images[:, :, 42:].reshape(len(indices), -1).max(axis=1) > 0
    return left | right


def write_imagefolder(folder: Path, records: ImageTextDataset, *, prefix: str) -> int:
    """Append ``records`` to the imagefolder ``folder`` as PNGs named ``<prefix>-<i>.png``;
    the number written."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, caption, label) in enumerate(
        zip(records.images, records.captions, records.labels, strict=True)
    ):
        name = f"{prefix}-{index:05d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption, "label": int(label)}))
    with (folder / METADATA_FILE).open("a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
    return len(lines)


def write_site_folders(
    out: Path,
    records: ImageTextDataset,
    canaries: CanarySet,
    *,
    num_sites: int,
    scheme: PartitionScheme,
    alpha: float,
    partition_seed: int,
    records_per_site: int,
) -> list[Path]:
    """One imagefolder per site under ``out/site-data/site-<k>``: the site's own capped
    partition and its included canaries; also ``out/canaries.json`` (which canary is
    where, no key). Folders already written are reused as they are."""
    folders = [out / SITES_DIR / f"site-{site}" for site in range(num_sites)]
    done = out / SITES_DIR / "complete"
    if done.exists():
        return folders
    for site, folder in enumerate(folders):
        if folder.exists():
            raise FileExistsError(f"{folder} is an unfinished canary folder: remove {out}")
        own = partition_indices(
            records.labels,
            num_partitions=num_sites,
            partition_id=site,
            scheme=scheme,
            alpha=alpha,
            seed=partition_seed,
        )[:records_per_site]
        write_imagefolder(folder, records.subset(own), prefix="record")
        mine = np.flatnonzero((canaries.sites == site) & canaries.included)
        write_imagefolder(folder, canaries.records.subset(mine), prefix="canary")
    (out / CANARIES_FILE).write_text(
        json.dumps(
            {
                "source_indices": canaries.source_indices.tolist(),
                "sites": canaries.sites.tolist(),
                "captions": canaries.records.captions,
                "included": canaries.included.tolist(),
            }
        )
    )
    done.write_text("")
    return folders
