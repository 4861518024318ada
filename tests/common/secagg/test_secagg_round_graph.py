"""The graph fixed after setup: over the participants (U1), with k and t for |U1|; what the
coordinator picks by default always satisfies a site that assumes the same fractions."""

import os

import pytest

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.common.secagg.neighbour_graph import (
    graph_parameters,
    required_threshold,
    stays_connected,
    threshold_for_degree,
)
from fedmm.common.secagg.payload_validation import InvalidPayloadError
from fedmm.common.secagg.round_config import SecAggRoundConfig
from fedmm.common.secagg.round_graph import RoundGraph
from fedmm.server.secagg.stages import CoordinatorGraphRules


def _config(sites: tuple[int, ...]) -> SecAggRoundConfig:
    return SecAggRoundConfig(
        round_id=1,
        session_nonce=os.urandom(32),
        site_ids=sites,
        bit_width=32,
        update_length=4,
        update_clip=1.0,
        max_weight=10,
    )


def test_payload_round_trip_and_every_participant_gets_k_neighbours() -> None:
    config = _config(tuple(range(10, 30)))
    participants = tuple(range(12, 30))
    graph = RoundGraph(
        participant_ids=participants, degree=6, threshold=3, session_nonce=config.session_nonce
    )
    assert RoundGraph.from_payload(graph.to_payload(), config=config) == graph
    assert set(graph.neighbours) == set(participants)
    assert all(
        len(peers) == 6 and peers <= set(participants) for peers in graph.neighbours.values()
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"participant_ids": [10, 11, 99]}, "not sampled"),
        ({"participant_ids": [12, 11, 13]}, "sorted"),
        ({"participant_ids": [12]}, "at least two"),
        ({"degree": 3}, "odd degree"),
        ({"degree": 5}, r"degree 5 must be in \[1, 4\]"),
        ({"threshold": 4}, "threshold"),
        ({"threshold": True}, "int"),
    ],
)
def test_malformed_graphs_are_rejected(change: dict, reason: str) -> None:
    config = _config((10, 11, 12, 13, 14))
    payload = {"participant_ids": [10, 11, 12, 13, 14], "degree": 2, "threshold": 2} | change
    with pytest.raises(InvalidPayloadError, match=reason):
        RoundGraph.from_payload(payload, config=config)


def test_the_complete_graph_needs_one_share_more_than_the_colluders_hold() -> None:
    assert required_threshold(10, 9, colluding=1) == 2
    assert required_threshold(10, 9, colluding=4) == 5
    assert threshold_for_degree(10, 9, colluding=1) == 6  # and a majority by default
    assert stays_connected(10, 9, removed=8)
    assert not stays_connected(20, 2, removed=6)


@pytest.mark.parametrize("sampled", [3, 5, 10, 20, 50, 120])
@pytest.mark.parametrize(("colluding", "dropout"), [(0.1, 0.2), (0.05, 0.1), (0.3, 0.1)])
def test_the_coordinators_defaults_pass_a_site_that_assumes_the_same(
    sampled: int, colluding: float, dropout: float
) -> None:
    policy = ClientSecAggPolicy(colluding_fraction=colluding, dropout_fraction=dropout)
    rules = CoordinatorGraphRules(adversarial_rate=colluding, dropout_rate=dropout)
    nonce = os.urandom(32)
    for advertised in range(max(2, rules.min_aggregation_size(sampled)), sampled + 1):
        graph = rules.graph_for(range(advertised), num_sampled=sampled, session_nonce=nonce)
        policy.require_graph(graph, num_sampled=sampled)  # raises if refused


def test_no_setup_dropouts_give_the_published_table() -> None:
    table = {2: (1, 2), 3: (2, 2), 4: (3, 3), 5: (4, 3), 10: (4, 2), 20: (8, 3), 50: (16, 6)}
    for n, (degree, threshold) in table.items():
        parameters = graph_parameters(n, colluding=-(-n // 10), dropouts=-(-n // 5))
        assert (parameters.degree, parameters.threshold) == (degree, threshold)
