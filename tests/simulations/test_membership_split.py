"""Members, non-members and the shadow pool: disjoint, balanced, from the right places."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.common.data.partitioning import partition_indices
from fedmm.simulations.privacy.membership_split import membership_split, shadow_site_indices

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


def _trained(scheme: str, records_per_site: int, sites: int = 5) -> set[int]:
    return {
        int(i)
        for site in range(sites)
        for i in partition_indices(
            LABELS, num_partitions=sites, partition_id=site, scheme=scheme, alpha=0.3, seed=0
        )[:records_per_site]
    }


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_split_is_disjoint_balanced_and_held_out_of_all_training(scheme: str) -> None:
    split = membership_split(
        LABELS,
        num_sites=5,
        scheme=scheme,  # type: ignore[arg-type]
        alpha=0.3,
        partition_seed=0,
        records_per_site=200,
        target_site=1,
    )
    own = partition_indices(
        LABELS, num_partitions=5, partition_id=1, scheme=scheme, alpha=0.3, seed=0
    )
    trained = _trained(scheme, 200)
    members, non_members, pool = (
        set(a.tolist()) for a in (split.members, split.non_members, split.shadow_pool)
    )
    assert len(members) == len(non_members) == len(split.members) > 0
    assert members <= set(own[:200].tolist())  # the target site's own training records
    assert non_members <= set(own[200:].tolist())  # same partition, never trained on
    assert not (non_members | pool) & trained  # no site trained on them
    assert not pool & (members | non_members)
    assert not pool & set(own.tolist())  # the shadow pool is other sites' held-out records
    assert split.trained_records == len(trained)
    assert split.is_member.tolist() == [True] * len(members) + [False] * len(non_members)
    assert np.array_equal(split.targets, np.r_[split.members, split.non_members])


def test_max_targets_caps_both_sides() -> None:
    split = membership_split(
        LABELS,
        num_sites=5,
        scheme="iid",
        alpha=0.3,
        partition_seed=0,
        records_per_site=300,
        max_targets=50,
    )
    assert len(split.members) == len(split.non_members) == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"records_per_site": 0}, "site-records-limit"),
        ({"records_per_site": 600}, "non-member"),  # IID: 600 per site, none left over
        ({"target_site": 5}, "target_site"),
    ],
)
def test_split_explains_what_cannot_work(kwargs: dict, message: str) -> None:
    arguments = {"records_per_site": 200, **kwargs}
    with pytest.raises(ValueError, match=message):
        membership_split(
            LABELS, num_sites=5, scheme="iid", alpha=0.3, partition_seed=0, **arguments
        )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shadow_sites_follow_the_run_recipe_on_the_pool(scheme: str) -> None:
    split = membership_split(
        LABELS,
        num_sites=5,
        scheme=scheme,
        alpha=0.3,
        partition_seed=0,
        records_per_site=150,  # type: ignore[arg-type]
    )
    sites = shadow_site_indices(
        split,
        LABELS,
        num_sites=5,
        scheme=scheme,
        alpha=0.3,
        records_per_site=150,
        shadow_seed=7,  # type: ignore[arg-type]
    )
    other = shadow_site_indices(
        split,
        LABELS,
        num_sites=5,
        scheme=scheme,
        alpha=0.3,
        records_per_site=150,
        shadow_seed=8,  # type: ignore[arg-type]
    )
    used = np.concatenate(sites)
    assert len(sites) == 5 and all(0 < len(s) <= 150 for s in sites)
    assert len(np.unique(used)) == len(used)  # disjoint sites
    assert set(used.tolist()) <= set(split.shadow_pool.tolist())
    assert not set(used.tolist()) & set(split.targets.tolist())
    assert not np.array_equal(np.sort(used), np.sort(np.concatenate(other)))  # seeds differ
