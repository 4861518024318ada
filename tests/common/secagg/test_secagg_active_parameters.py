"""The numbers of active-coordinator mode: t = c + 1, t_cc, the dropout allowance and k.

Each bound is checked as the property it protects, by counting over every case up to a size,
not against a formula copied from the module.
"""

from __future__ import annotations

import itertools

import pytest

from fedmm.common.secagg.active_parameters import (
    active_graph_parameters,
    consistency_threshold,
    corrupt_sites,
    dropout_sites,
    minimum_active_aggregation_size,
)
from fedmm.common.secagg.neighbour_graph import neighbour_graph


def _cases(max_sites: int):
    for n in range(3, max_sites + 1):
        for corrupt in range(0, n - 1):
            for dropouts in range(0, n):
                try:
                    yield active_graph_parameters(n, corrupt=corrupt, dropouts=dropouts)
                except ValueError:
                    continue


def test_corrupt_sites_are_counted_over_the_roster_and_rounded_up() -> None:
    assert corrupt_sites(fraction=0.1, roster_size=10) == 1
    assert corrupt_sites(fraction=0.1, roster_size=11) == 2
    assert corrupt_sites(fraction=0.0, roster_size=50) == 0
    assert dropout_sites(fraction=0.2, num_sampled=10) == 2
    with pytest.raises(ValueError):
        corrupt_sites(fraction=1.0, roster_size=10)


def test_the_corrupt_sites_never_hold_a_threshold_of_shares() -> None:
    """t = c + 1: in any graph, a site's c corrupt holders hold fewer than t shares."""
    for parameters in _cases(40):
        assert parameters.threshold >= parameters.corrupt + 1
        assert parameters.threshold >= 2


def test_no_two_survivor_sets_can_both_collect_t_cc_signatures() -> None:
    """Honest sites sign one set each, corrupt ones sign anything: for every n1 and c, and
    every way of splitting the honest sites between two sets, one set stays below t_cc."""
    for n in range(3, 60):
        for corrupt in range(0, n - 1):
            needed = consistency_threshold(n, corrupt=corrupt)
            honest = n - corrupt
            for first_share in range(0, honest + 1):
                second_share = honest - first_share
                assert min(first_share, second_share) + corrupt < needed


def test_two_survivor_sets_by_brute_force_on_small_rounds() -> None:
    """Every pair of distinct survivor sets over up to six sites and every set of corrupt
    sites: honest signers of the two sets are disjoint, so one set misses t_cc."""
    for n in range(3, 7):
        sites = range(n)
        for corrupt in range(0, n - 1):
            needed = consistency_threshold(n, corrupt=corrupt)
            for colluders in itertools.combinations(sites, corrupt):
                subsets = [
                    set(s) for size in range(1, n + 1) for s in itertools.combinations(sites, size)
                ]
                for first, second in itertools.combinations(subsets, 2):
                    honest = set(sites) - set(colluders)
                    shared = first & second & honest
                    # Corrupt members sign both sets; honest members sign one set each: try
                    # every split of the honest members the two sets have in common.
                    for given_to_first in range(len(shared) + 1):
                        first_count = (
                            len(first & set(colluders))
                            + len((first - second) & honest)
                            + given_to_first
                        )
                        second_count = (
                            len(second & set(colluders))
                            + len((second - first) & honest)
                            + len(shared)
                            - given_to_first
                        )
                        assert first_count < needed or second_count < needed


def test_the_dropout_allowance_leaves_an_honest_surviving_partner() -> None:
    """A site's partners hold at least k - D - c honest sites; the coordinator may call at
    most D of them dropped: at least one honest partner survives, so every group of inputs
    the coordinator can separate has at least two honest sites."""
    for parameters in _cases(40):
        honest_partners = parameters.required_partners - parameters.corrupt
        assert honest_partners - parameters.dropout_allowance >= 1
        assert parameters.min_honest_group >= 2


def test_shares_survive_the_allowed_dropouts() -> None:
    """With at most D sites gone, a site has at least k - D + 1 holders left (itself and its
    neighbours): enough for the threshold."""
    for parameters in _cases(40):
        holders_left = parameters.degree - parameters.dropout_allowance + 1
        assert parameters.threshold <= holders_left


def test_all_survivors_can_give_the_consistency_signatures() -> None:
    for parameters in _cases(40):
        survivors = parameters.num_participants - parameters.dropout_allowance
        assert parameters.consistency_threshold <= survivors


def test_every_default_degree_builds_a_graph() -> None:
    for parameters in _cases(30):
        ids = list(range(parameters.num_participants))
        graph = neighbour_graph(site_ids=ids, degree=parameters.degree, seed=b"s" * 32)
        assert all(len(peers) == parameters.degree for peers in graph.values())


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        # n, (k, t, D, t_cc) with c = ceil(0.1 n), d = ceil(0.2 n): the docs' table.
        (3, (2, 2, 0, 3)),
        (5, (4, 2, 1, 4)),
        (10, (6, 2, 2, 6)),
        (20, (11, 3, 4, 12)),
        (50, (26, 6, 10, 28)),
        (100, (51, 11, 20, 56)),
    ],
)
def test_defaults_for_the_whole_roster(n: int, expected: tuple[int, int, int, int]) -> None:
    parameters = active_graph_parameters(
        n,
        corrupt=corrupt_sites(fraction=0.1, roster_size=n),
        dropouts=dropout_sites(fraction=0.2, num_sampled=n),
    )
    got = (
        parameters.degree,
        parameters.threshold,
        parameters.dropout_allowance,
        parameters.consistency_threshold,
    )
    assert got == expected


def test_overrides_and_impossible_rounds() -> None:
    complete = active_graph_parameters(12, corrupt=1, dropouts=2, degree=50)
    assert complete.complete and complete.degree == 11
    assert active_graph_parameters(12, corrupt=1, dropouts=2, threshold=4).threshold == 4
    with pytest.raises(ValueError, match="below c \\+ 1"):
        active_graph_parameters(12, corrupt=3, dropouts=0, degree=3)
    with pytest.raises(ValueError, match="below c \\+ 1"):
        active_graph_parameters(12, corrupt=3, dropouts=0, threshold=3)
    with pytest.raises(ValueError, match="cannot hide an honest input"):
        active_graph_parameters(4, corrupt=3, dropouts=0)
    with pytest.raises(ValueError, match="exceeds"):
        active_graph_parameters(12, corrupt=1, dropouts=2, threshold=9)


def test_the_floor_keeps_two_honest_inputs_beyond_the_corrupt_ones() -> None:
    assert minimum_active_aggregation_size(corrupt=0) == 3
    assert minimum_active_aggregation_size(corrupt=5) == 7
    assert minimum_active_aggregation_size(corrupt=1, min_sites=5, honest_sites=9) == 9
