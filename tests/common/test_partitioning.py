"""Splitting labels among simulated sites: disjoint, covering, deterministic, skewed on demand."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.common.data.dataset import NO_LABEL
from fedmm.common.data.partitioning import PREFERRED_MIN_PARTITION_SIZE, partition_indices

NUM_CLASSES = 10
SORTED_LABELS = np.repeat(np.arange(NUM_CLASSES), 100)  # 1,000 records, sorted by class


def all_partitions(
    labels: np.ndarray, num_partitions: int, scheme: str, **kwargs: float
) -> list[np.ndarray]:
    """Every partition's indices, as each simulated site would ask for its own."""
    return [
        partition_indices(
            labels, num_partitions=num_partitions, partition_id=pid, scheme=scheme, **kwargs
        )
        for pid in range(num_partitions)
    ]


def mean_label_skew(labels: np.ndarray, partitions: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label mix and the whole's."""
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=NUM_CLASSES) / len(p) - overall).sum()
        for p in partitions
    ]
    return float(np.mean(distances))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_every_record(scheme: str) -> None:
    partitions = all_partitions(SORTED_LABELS, 7, scheme, alpha=0.5, seed=3)
    joined = np.concatenate(partitions)

    assert all(p.dtype == np.int64 for p in partitions)
    assert len(joined) == len(SORTED_LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(SORTED_LABELS)))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in all_partitions(SORTED_LABELS, 7, "iid")]

    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(SORTED_LABELS)


def test_iid_shuffles_before_sharding_so_every_site_sees_every_class() -> None:
    partitions = all_partitions(SORTED_LABELS, 7, "iid", seed=0)

    assert all(len(np.unique(SORTED_LABELS[p])) == NUM_CLASSES for p in partitions)
    assert mean_label_skew(SORTED_LABELS, partitions) < 0.1


def test_small_alpha_skews_label_mix_far_more_than_large_alpha() -> None:
    for seed in range(3):
        skewed = all_partitions(SORTED_LABELS, 10, "dirichlet", alpha=0.1, seed=seed)
        mixed = all_partitions(SORTED_LABELS, 10, "dirichlet", alpha=100.0, seed=seed)

        assert mean_label_skew(SORTED_LABELS, skewed) > 0.5
        assert mean_label_skew(SORTED_LABELS, mixed) < 0.1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_split_other_seed_other_split(scheme: str) -> None:
    first = all_partitions(SORTED_LABELS, 5, scheme, seed=11)
    again = all_partitions(SORTED_LABELS.copy(), 5, scheme, seed=11)
    other = all_partitions(SORTED_LABELS, 5, scheme, seed=12)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_returned_indices_are_the_callers_to_change() -> None:
    first = partition_indices(SORTED_LABELS, num_partitions=4, partition_id=0, scheme="iid")
    expected = first.copy()
    first[:] = -5
    second = partition_indices(SORTED_LABELS, num_partitions=4, partition_id=0, scheme="iid")

    assert np.array_equal(second, expected)


def test_different_labels_of_the_same_length_give_a_different_split() -> None:
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(SORTED_LABELS)
    on_sorted = partition_indices(
        SORTED_LABELS, num_partitions=4, partition_id=0, scheme="dirichlet", alpha=0.1
    )
    on_shuffled = partition_indices(
        shuffled, num_partitions=4, partition_id=0, scheme="dirichlet", alpha=0.1
    )

    assert not np.array_equal(on_sorted, on_shuffled)


def test_unlabelled_records_are_split_like_one_more_class() -> None:
    labels = np.concatenate([SORTED_LABELS[:500], np.full(100, NO_LABEL)])
    joined = np.concatenate(all_partitions(labels, 4, "dirichlet", alpha=1.0))

    assert np.array_equal(np.sort(joined), np.arange(len(labels)))


def test_dirichlet_on_a_fashion_mnist_sized_split_gives_every_site_enough_records() -> None:
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, 60_000)
    partitions = all_partitions(labels, 100, "dirichlet", alpha=0.3, seed=0)

    assert min(len(p) for p in partitions) >= PREFERRED_MIN_PARTITION_SIZE
    assert sum(len(p) for p in partitions) == 60_000


@pytest.mark.parametrize("partition_id", [-1, 4])
def test_partition_id_out_of_range_is_refused(partition_id: int) -> None:
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 3\]"):
        partition_indices(SORTED_LABELS, num_partitions=4, partition_id=partition_id, scheme="iid")


def test_unknown_scheme_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'pathological'.*iid, dirichlet"):
        partition_indices(
            SORTED_LABELS,
            num_partitions=4,
            partition_id=0,
            scheme="pathological",  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_alpha_must_be_positive_and_finite(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(
            SORTED_LABELS, num_partitions=4, partition_id=0, scheme="dirichlet", alpha=alpha
        )


def test_iid_ignores_alpha() -> None:
    with_bad_alpha = partition_indices(
        SORTED_LABELS, num_partitions=4, partition_id=1, scheme="iid", alpha=-1.0
    )
    default = partition_indices(SORTED_LABELS, num_partitions=4, partition_id=1, scheme="iid")

    assert np.array_equal(with_bad_alpha, default)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_more_partitions_than_records_is_refused(scheme: str) -> None:
    with pytest.raises(ValueError, match="cannot split 3 records into 4 partitions"):
        partition_indices(np.arange(3), num_partitions=4, partition_id=0, scheme=scheme)


def test_num_partitions_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_partitions must be at least 1"):
        partition_indices(SORTED_LABELS, num_partitions=0, partition_id=0, scheme="iid")


def test_impossible_dirichlet_split_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="larger alpha, fewer partitions or more data"):
        partition_indices(
            np.arange(10), num_partitions=10, partition_id=0, scheme="dirichlet", alpha=0.01
        )


@pytest.mark.parametrize(
    "labels", [np.linspace(0, 1, 10), np.zeros((5, 2), dtype=np.int64), ["a", "b"]]
)
def test_labels_must_be_one_dimensional_integers(labels: object) -> None:
    with pytest.raises(ValueError, match="1-D integer array"):
        partition_indices(labels, num_partitions=2, partition_id=0, scheme="iid")  # type: ignore[arg-type]


def test_non_integer_partition_id_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        partition_indices(SORTED_LABELS, num_partitions=4, partition_id=1.5, scheme="iid")  # type: ignore[arg-type]
