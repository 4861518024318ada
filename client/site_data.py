"""Which records a site trains on: its own imagefolder, or its simulated partition."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.data.benchmark import CANVAS_SHAPE, benchmark_train_records
from common.data.dataset import ImageTextDataset
from common.data.partitioning import partition_indices
from common.train_request import TrainRequest


class SiteDataError(ValueError):
    """The site's node config does not say where its data is."""


@lru_cache(maxsize=4)
def _imagefolder(path: str) -> ImageTextDataset:
    from common.data.imagefolder import load_imagefolder

    data, _report = load_imagefolder(Path(path), image_size=CANVAS_SHAPE)
    return data


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


def load_site_data(node_config: Mapping[str, Any], request: TrainRequest) -> ImageTextDataset:
    """A site's training records.

    ``imagefolder`` in the node config: the site's own folder (deployment). Otherwise
    ``partition-id`` and ``num-partitions`` (set by Flower's simulation): that partition of
    the built-in benchmark (its first ``site-records-limit`` records when that is set);
    the node config's ``data-dir`` wins over the run's.
    """
    if "imagefolder" in node_config:
        return _imagefolder(str(node_config["imagefolder"]))
    if "partition-id" in node_config and "num-partitions" in node_config:
        return _benchmark_partition(
            str(node_config.get("data-dir", request.data_dir)),
            int(node_config["num-partitions"]),
            int(node_config["partition-id"]),
            request.partition,
            float(request.dirichlet_alpha),
            int(request.seed),
            int(request.site_records_limit),
        )
    raise SiteDataError(
        "node config names no data: set imagefolder=PATH (a folder with metadata.jsonl) "
        "or, in simulation, partition-id and num-partitions"
    )
