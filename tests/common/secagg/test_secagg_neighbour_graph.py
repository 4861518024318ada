import os

import pytest

from fedmm.common.secagg.neighbour_graph import default_graph_parameters, neighbour_graph


@pytest.mark.parametrize(
    ("sites", "degree"), [(2, 1), (5, 2), (5, 4), (10, 3), (10, 4), (50, 16), (51, 50)]
)
def test_graph_is_regular_symmetric_and_loop_free(sites: int, degree: int) -> None:
    site_ids = [10 * i + 3 for i in range(sites)]
    graph = neighbour_graph(site_ids=site_ids, degree=degree, seed=os.urandom(32))
    assert set(graph) == set(site_ids)
    for site, peers in graph.items():
        assert len(peers) == degree
        assert site not in peers
        assert all(site in graph[peer] for peer in peers)


def test_complete_graph_when_degree_is_n_minus_one() -> None:
    site_ids = list(range(1, 8))
    graph = neighbour_graph(site_ids=site_ids, degree=6, seed=os.urandom(32))
    assert all(peers == set(site_ids) - {site} for site, peers in graph.items())


def test_graph_is_deterministic_in_the_seed_and_varies_with_it() -> None:
    site_ids = list(range(100, 140))
    seed = os.urandom(32)
    first = neighbour_graph(site_ids=site_ids, degree=6, seed=seed)
    assert first == neighbour_graph(site_ids=list(reversed(site_ids)), degree=6, seed=seed)
    assert first != neighbour_graph(site_ids=site_ids, degree=6, seed=os.urandom(32))


def test_a_cached_graph_is_the_same_graph_and_callers_cannot_change_it() -> None:
    seed = os.urandom(32)
    sites = list(range(100, 140))
    first = neighbour_graph(site_ids=sites, degree=6, seed=seed)
    first[100] = frozenset()  # a caller's copy only
    second = neighbour_graph(site_ids=tuple(sites), degree=6, seed=seed)
    assert len(second[100]) == 6
    assert second == neighbour_graph(site_ids=sites, degree=6, seed=bytes(seed))
    assert second != neighbour_graph(site_ids=sites, degree=6, seed=os.urandom(32))


def test_invalid_graphs_are_rejected() -> None:
    with pytest.raises(ValueError, match="odd degree"):
        neighbour_graph(site_ids=range(5), degree=3, seed=bytes(32))
    with pytest.raises(ValueError, match="distinct"):
        neighbour_graph(site_ids=[1, 1, 2], degree=1, seed=bytes(32))
    with pytest.raises(ValueError, match="degree"):
        neighbour_graph(site_ids=range(5), degree=5, seed=bytes(32))


def test_defaults_grow_logarithmically_and_stay_valid() -> None:
    previous_degree = 0
    for sites in [2, 3, 5, 10, 20, 50, 100, 1000, 10_000]:
        parameters = default_graph_parameters(sites)
        assert 1 <= parameters.degree <= sites - 1
        assert 2 <= parameters.threshold <= parameters.degree + 1
        assert parameters.degree >= previous_degree
        previous_degree = parameters.degree
        neighbour_graph(site_ids=range(sites), degree=parameters.degree, seed=bytes(32))
    assert default_graph_parameters(10_000).degree < 100  # O(log n), far below n - 1


def test_small_federations_use_the_complete_graph_with_a_majority_threshold() -> None:
    assert default_graph_parameters(2).degree == 1
    assert default_graph_parameters(2).threshold == 2
    four = default_graph_parameters(4)
    assert (four.degree, four.threshold) == (3, 3)


def test_more_colluders_need_more_neighbours_and_a_higher_threshold() -> None:
    relaxed = default_graph_parameters(1000, adversarial_rate=0.05, dropout_rate=0.1)
    strict = default_graph_parameters(1000, adversarial_rate=0.3, dropout_rate=0.1)
    assert strict.degree > relaxed.degree
    assert strict.threshold > relaxed.threshold
