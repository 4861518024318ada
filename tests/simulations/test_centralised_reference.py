"""The centralised reference's declared-public records are drawn at random and never among
the records its DP-SGD trains on."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.simulations.centralised_reference import public_split


def test_public_and_private_records_are_disjoint_and_cover_the_set() -> None:
    public, private = public_split(1000, 50, seed=3)
    assert len(public) == 50 and len(private) == 950
    assert not set(public) & set(private)
    assert np.array_equal(np.sort(np.concatenate([public, private])), np.arange(1000))
    assert public.max() > 500  # drawn across the set, not its first rows
    again, _ = public_split(1000, 50, seed=3)
    other, _ = public_split(1000, 50, seed=4)
    assert np.array_equal(public, again) and not np.array_equal(public, other)


def test_a_public_share_of_every_record_is_refused() -> None:
    with pytest.raises(SystemExit, match="--public-records"):
        public_split(10, 10, seed=0)
