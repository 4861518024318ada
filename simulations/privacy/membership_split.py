"""Which benchmark records are members, non-members and the attacker's public data.

The sites share the 60k-image training split (54,000 records); the official 10k test split
stays the held-out evaluation set and is not touched here. For a membership experiment
some training records must be trained on by no site, so the sweep caps every site at its
first ``records_per_site`` records (run config ``site-records-limit``): the rest of each
site's partition is held out of all training. With ``P_k`` the partition of site ``k``
(the same Flower partitioner the simulated sites use) and ``L`` the cap:

- members: records of ``P_target[:L]``, the target site's own training records;
- non-members: records of ``P_target[L:]``, from the same partition and so from exactly
  the same distribution (the partitioners shuffle within a partition), trained on by no
  site; members and non-members are subsampled to the same number (balanced);
- shadow pool (LiRA's "public data"): the held-out records of every other site,
  ``P_k[L:]`` for ``k != target``; disjoint from both target sets, so every shadow model
  trained on it is an OUT model for every target (offline LiRA, Carlini et al., IEEE S&P
  2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmm.common.data.partitioning import PartitionScheme, partition_indices


@dataclass(frozen=True)
class MembershipSplit:
    """Indices into the benchmark's training records."""

    target_site: int
    members: np.ndarray
    non_members: np.ndarray
    shadow_pool: np.ndarray
    trained_records: int  # records trained on by any site

    @property
    def targets(self) -> np.ndarray:
        """Members first, then non-members."""
        return np.concatenate([self.members, self.non_members])

    @property
    def is_member(self) -> np.ndarray:
        return np.r_[np.ones(len(self.members), bool), np.zeros(len(self.non_members), bool)]


def membership_split(
    labels: np.ndarray,
    *,
    num_sites: int,
    scheme: PartitionScheme,
    alpha: float,
    partition_seed: int,
    records_per_site: int,
    target_site: int = 0,
    max_targets: int | None = None,
    seed: int = 0,
) -> MembershipSplit:
    """The split for one federated run; ``max_targets`` caps members (and non-members)."""
    if records_per_site < 1:
        raise ValueError(
            "a membership experiment needs records no site trains on: set records_per_site "
            f"(run config site-records-limit) to at least 1, got {records_per_site}"
        )
    if not 0 <= target_site < num_sites:
        raise ValueError(f"target_site must be in [0, {num_sites - 1}], got {target_site}")
    partitions = [
        partition_indices(
            labels,
            num_partitions=num_sites,
            partition_id=site,
            scheme=scheme,
            alpha=alpha,
            seed=partition_seed,
        )
        for site in range(num_sites)
    ]
    own = partitions[target_site]
    heads, tails = own[:records_per_site], own[records_per_site:]
    count = min(len(heads), len(tails), max_targets or len(own))
    if count < 1:
        raise ValueError(
            f"site {target_site} has {len(own)} records and trains on {len(heads)}: none is "
            "left over as a non-member; lower records_per_site (site-records-limit) or choose "
            "another target site"
        )
    pool = np.concatenate(
        [p[records_per_site:] for k, p in enumerate(partitions) if k != target_site]
    )
    if len(pool) == 0:
        raise ValueError(
            "no site other than the target holds records beyond records_per_site: there is no "
            "public data for shadow models; lower records_per_site"
        )
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(heads, size=count, replace=False))
    non_members = np.sort(rng.choice(tails, size=count, replace=False))
    trained = sum(min(len(p), records_per_site) for p in partitions)
    return MembershipSplit(
        target_site=target_site,
        members=members,
        non_members=non_members,
        shadow_pool=np.sort(pool),
        trained_records=trained,
    )


def shadow_site_indices(
    split: MembershipSplit,
    labels: np.ndarray,
    *,
    num_sites: int,
    scheme: PartitionScheme,
    alpha: float,
    records_per_site: int,
    shadow_seed: int,
) -> list[np.ndarray]:
    """One shadow federation's site data: the target run's recipe (partition, then keep each
    site's first ``records_per_site``) applied to the shadow pool with its own seed."""
    pool = split.shadow_pool
    return [
        pool[
            partition_indices(
                labels[pool],
                num_partitions=num_sites,
                partition_id=site,
                scheme=scheme,
                alpha=alpha,
                seed=shadow_seed,
            )[:records_per_site]
        ]
        for site in range(num_sites)
    ]
