"""The site's held-out records: a keyed, per-record split that no training batch ever sees.

Each record's place is decided by the record alone: HMAC-SHA256 (RFC 2104, from
``cryptography``) of the record's caption and pixels, keyed by a key derived from the site
secret (the one that keys its pseudonyms, ``client.deid.site_secret``); the first 8 bytes
of the tag, read as a fraction of 2^64, below the run's ``eval-fraction`` put the record in
the held-out split. So:

- the split is the same in every run and round with the same secret, data and
  ``image-size``/``image-channels`` (the pixels hashed are the ones the model reads), and
  another secret draws another split;
- adding or removing one record never moves another one: a training record's DP
  guarantee (its neighbouring datasets differ in one record) is unaffected by the split,
  and the record count the site releases and its sampling rate follow its training records
  only (``client.site_data``);
- without the secret nobody, the coordinator included, can tell which records are held out.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, hmac

from fedmm.common.data.dataset import ImageTextDataset

logger = logging.getLogger(__name__)

#: Domain separation: the split's key is derived from the site secret for this use only.
_KEY_LABEL = b"fedmm held-out split v1"


@dataclass(frozen=True)
class SiteSplit:
    """A site's records: those it trains on, and those it only evaluates on."""

    train: ImageTextDataset
    held_out: ImageTextDataset


def split_key(site_secret: bytes) -> bytes:
    """The split's own key: HMAC-SHA256(site secret, label), so the pseudonym key is
    never used for anything else."""
    mac = hmac.HMAC(site_secret, hashes.SHA256())
    mac.update(_KEY_LABEL)
    return mac.finalize()


def record_digest(image: np.ndarray, caption: str) -> bytes:
    """SHA-256 of one record: its image's shape and pixels, and its caption (UTF-8)."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    digest = hashlib.sha256()
    digest.update(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    digest.update(caption.encode("utf-8"))
    return digest.digest()


def held_out_mask(data: ImageTextDataset, *, site_secret: bytes, fraction: float) -> np.ndarray:
    """Boolean ``(N,)``: True for the records ``data`` holds out at ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval-fraction must be in [0, 1), got {fraction!r}")
    key = split_key(site_secret)
    mask = np.zeros(len(data), dtype=bool)
    threshold = int(fraction * 2**64)
    for index in range(len(data)):
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(record_digest(data.images[index], data.captions[index]))
        mask[index] = int.from_bytes(mac.finalize()[:8], "big") < threshold
    return mask


def split_records(data: ImageTextDataset, *, site_secret: bytes, fraction: float) -> SiteSplit:
    """``data`` split into training and held-out records (each in its original order)."""
    mask = held_out_mask(data, site_secret=site_secret, fraction=fraction)
    split = SiteSplit(
        train=data.subset(np.flatnonzero(~mask)), held_out=data.subset(np.flatnonzero(mask))
    )
    logger.info(
        "records: %d for training (the privacy ledger and the released record count cover "
        "these only), %d held out for evaluation (eval-fraction %g)",
        len(split.train),
        len(split.held_out),
        fraction,
    )
    return split
