"""Split a labelled dataset among simulated sites with Flower's own partitioners.

Each simulated site calls :func:`partition_indices` once with the labels of the whole
training set and its own ``partition_id``; it then keeps only the records at the returned
indices. The split is a pure function of ``(labels, num_partitions, scheme, alpha, seed)``,
so every site computes the same split independently and the partitions are disjoint and
together cover every record.

Schemes:

- ``"iid"``: the record order is shuffled with ``seed``, then Flower's ``IidPartitioner``
  cuts it into contiguous shards whose sizes differ by at most one. (``IidPartitioner``
  itself does not shuffle; ``FederatedDataset`` normally does it before partitioning,
  so this module does the same.)
- ``"dirichlet"``: Flower's ``DirichletPartitioner`` over the label column. Each class is
  divided among the partitions with proportions drawn from ``Dirichlet(alpha)``: small
  alpha gives few classes per site and unequal site sizes, large alpha approaches IID.
  Self-balancing is off, so the skew is the one alpha asks for. Records labelled
  ``NO_LABEL`` (-1) are treated as one more class.

The full split is computed once per process and kept in a small in-process cache, so
that many simulated sites served by one worker process pay for it once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

logger = logging.getLogger(__name__)

PartitionScheme = Literal["iid", "dirichlet"]
PARTITION_SCHEMES: tuple[str, ...] = get_args(PartitionScheme)

LABEL_COLUMN = "label"
INDEX_COLUMN = "index"

# Every Dirichlet partition gets at least this many records when the data allow it;
# a site with almost no records cannot train (and pays a huge DP noise per record).
PREFERRED_MIN_PARTITION_SIZE = 10

_CACHED_SPLITS = 8


def partition_indices(
    labels: np.ndarray,
    *,
    num_partitions: int,
    partition_id: int,
    scheme: PartitionScheme,
    alpha: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """Indices (``int64``, into ``labels``) of the records that belong to one partition.

    Args:
        labels: integer class labels of the whole dataset, shape ``(N,)``.
        num_partitions: number of simulated sites, at least 1 and at most ``N``.
        partition_id: which site's share to return, in ``[0, num_partitions)``.
        scheme: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration, > 0 (used by ``"dirichlet"`` only).
        seed: the split is a deterministic function of the arguments and this seed.

    Raises:
        TypeError: if num_partitions, partition_id or seed is not an integer.
        ValueError: on an unknown scheme, a partition id out of range, alpha <= 0, labels
            that are not a 1-D integer array, or more partitions than records (or a
            Dirichlet split that cannot give every partition a record).
    """
    labels = _checked_labels(labels)
    num_partitions, partition_id, seed = (
        operator.index(num_partitions),
        operator.index(partition_id),
        operator.index(seed),
    )
    _check_split_arguments(
        num_records=len(labels),
        num_partitions=num_partitions,
        partition_id=partition_id,
        scheme=scheme,
        alpha=alpha,
    )
    alpha_used = float(alpha) if scheme == "dirichlet" else 0.0  # IID ignores alpha
    split = _cached_split(_LabelsKey.of(labels), num_partitions, scheme, alpha_used, seed)
    return split[partition_id].copy()


def dirichlet_min_partition_size(num_records: int, num_partitions: int) -> int:
    """The smallest partition the Dirichlet split accepts before it resamples.

    ``PREFERRED_MIN_PARTITION_SIZE`` when there are plenty of records; for small datasets
    at most half of an even share, and never below one record (an empty site cannot
    train).
    """
    half_even_share = num_records // (2 * num_partitions)
    return max(1, min(PREFERRED_MIN_PARTITION_SIZE, half_even_share))


def _checked_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as a 1-D ``int64`` array, or a ValueError saying what is wrong."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}"
        )
    return labels.astype(np.int64, copy=False)


def _check_split_arguments(
    *, num_records: int, num_partitions: int, partition_id: int, scheme: str, alpha: float
) -> None:
    """Raise a ValueError naming the first argument that cannot give a valid split."""
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; allowed values: {', '.join(PARTITION_SCHEMES)}"
        )
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must be in [0, {num_partitions - 1}] for {num_partitions} "
            f"partitions, got {partition_id}"
        )
    if num_partitions > num_records:
        raise ValueError(
            f"cannot split {num_records} records into {num_partitions} partitions: "
            "use fewer partitions (sites) or more data"
        )
    if scheme == "dirichlet" and not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be a finite number > 0, got {alpha}")


@dataclass(frozen=True)
class _LabelsKey:
    """Hashable stand-in for a label array: equal when the labels are equal."""

    digest: bytes
    labels: np.ndarray = field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, labels: np.ndarray) -> _LabelsKey:
        hasher = hashlib.blake2b(digest_size=16)
        hasher.update(str(labels.shape).encode())
        hasher.update(np.ascontiguousarray(labels).tobytes())
        return cls(digest=hasher.digest(), labels=labels)


@functools.lru_cache(maxsize=_CACHED_SPLITS)
def _cached_split(
    key: _LabelsKey, num_partitions: int, scheme: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Every partition's indices, computed once per distinct set of arguments."""
    partitioner = _build_partitioner(
        key.labels, num_partitions=num_partitions, scheme=scheme, alpha=alpha, seed=seed
    )
    split = _split_with(partitioner, num_partitions, scheme=scheme)
    for indices in split:
        indices.flags.writeable = False
    return split


def _build_partitioner(
    labels: np.ndarray, *, num_partitions: int, scheme: str, alpha: float, seed: int
) -> Partitioner:
    """A Flower partitioner holding a local two-column dataset (label, record index)."""
    # Imported here: `datasets` costs about 2 s to import, and only simulations split.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    record_order = np.arange(len(labels), dtype=np.int64)
    partitioner: Partitioner
    if scheme == "iid":
        record_order = np.random.default_rng(seed).permutation(record_order)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL_COLUMN,
            alpha=alpha,
            min_partition_size=dirichlet_min_partition_size(len(labels), num_partitions),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    # The arrow format makes every column read (the partitioner's and ours) one array
    # conversion; the default format iterates row by row (seconds for 60k records).
    partitioner.dataset = Dataset.from_dict(
        {LABEL_COLUMN: labels[record_order], INDEX_COLUMN: record_order}
    ).with_format("arrow")
    return partitioner


def _split_with(
    partitioner: Partitioner, num_partitions: int, *, scheme: str
) -> tuple[np.ndarray, ...]:
    """Run the partitioner for every partition id; explain a Dirichlet split that fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            split = tuple(
                np.asarray(partitioner.load_partition(pid)[INDEX_COLUMN], dtype=np.int64)
                for pid in range(num_partitions)
            )
        except ValueError as error:
            if scheme != "dirichlet":
                raise
            raise ValueError(
                f"the Dirichlet split could not give each of {num_partitions} partitions "
                "enough records after 10 attempts; use a larger alpha, fewer partitions "
                f"or more data ({error})"
            ) from error
    _pass_on_warnings(caught)
    return split


def _pass_on_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Log the Dirichlet partitioner's resampling notices; re-issue any other warning."""
    resamplings = [w for w in caught if "min_partition_size" in str(w.message)]
    if resamplings:
        logger.debug(
            "Dirichlet split resampled %d times to reach the minimum partition size",
            len(resamplings),
        )
    for warning in caught:
        if warning not in resamplings:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
