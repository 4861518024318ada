"""Whole rounds in active-coordinator mode, in process: signed keys, graph from their hash,
bound keys and bundles, the consistency check; dropouts at every stage (Bonawitz et al.,
CCS 2017, section 6; Bell et al., CCS 2020).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.stages import client_state_from_record, client_state_to_record
from fedmm.common.secagg.graph_seed import graph_seed
from fedmm.common.secagg.neighbour_graph import neighbour_graph
from fedmm.common.site_refusal import RefusalCode
from fedmm.server.secagg.stages import (
    ABORTED,
    FINISHED,
    server_collect_consistency,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_unmask,
)
from tests.secagg_protocol.active_federation import (
    SiteGroup,
    SiteInputs,
    make_federation,
    run_active_round,
    start_active_round,
)
from tests.secagg_protocol.test_secagg_in_process import assert_matches_plain_sum

ACTIVE_STAGES = ("setup", "share_keys", "masked_input", "consistency", "unmask")


@pytest.mark.parametrize("num_sites", [3, 4, 10, 23])
def test_the_masked_sum_equals_the_plain_weighted_sum(num_sites: int) -> None:
    federation = make_federation(num_sites, seed=num_sites)
    outcome = run_active_round(federation, length=1500, seed=num_sites)
    assert_matches_plain_sum(outcome)
    assert len(outcome.server.survivor_ids) == num_sites
    assert not outcome.refusals


def test_the_graph_is_drawn_from_the_signed_keys_not_the_session_nonce() -> None:
    federation = make_federation(12, seed=1)
    outcome = run_active_round(federation, length=100, seed=1)
    server = outcome.server
    assert server.graph is not None
    seed = graph_seed(
        parameters_digest=server.config.digest(),
        participant_ids=server.advertised_ids,
        names=server.site_names,
        channel_public_keys=server.channel_public_keys,
        mask_public_keys=server.mask_public_keys,
    )
    assert server.graph.ring_seed == seed != server.config.session_nonce
    expected = neighbour_graph(
        site_ids=server.advertised_ids, degree=server.graph.degree, seed=seed
    )
    for site, reply in outcome.replies["share_keys"].items():
        assert set(reply["receiver_ids"]) == expected[site]


@pytest.mark.parametrize("stage", ACTIVE_STAGES)
def test_dropouts_within_the_allowance_are_tolerated_at_every_stage(stage: str) -> None:
    # 10 sites: c = 1, d = 2, so k = 6, t = 2, D = 2, t_cc = 6.
    federation = make_federation(10, seed=3)
    lost = set(federation.site_ids[:2])
    outcome = run_active_round(federation, length=300, seed=3, drop={stage: lost})
    assert_matches_plain_sum(outcome)
    if stage in ("consistency", "unmask"):  # their masked inputs arrived: they are in the sum
        assert len(outcome.server.survivor_ids) == 10
    else:
        assert set(outcome.server.survivor_ids).isdisjoint(lost)


@pytest.mark.parametrize("stage", ["share_keys", "masked_input"])
def test_more_dropouts_than_the_allowance_abort_before_unmasking(stage: str) -> None:
    federation = make_federation(10, seed=4)
    lost = set(federation.site_ids[:3])
    outcome = run_active_round(federation, length=300, seed=4, drop={stage: lost})
    assert outcome.server.stage == ABORTED and outcome.aggregate is None
    assert "more than the 2 the round allows" in (outcome.server.abort_reason or "")
    assert not outcome.replies.get("unmask")


def test_too_few_signatures_abort_the_round_before_unmasking() -> None:
    federation = make_federation(10, seed=5)
    lost = set(federation.site_ids[:5])  # 5 of 10 sign; t_cc = 6
    outcome = run_active_round(federation, length=300, seed=5, drop={"consistency": lost})
    assert outcome.server.stage == ABORTED
    assert "5 survivors signed the survivor set, fewer than the 6" in (
        outcome.server.abort_reason or ""
    )
    assert not outcome.requests.get("unmask")


def test_setup_dropouts_shrink_the_graph_but_not_the_corrupt_count() -> None:
    """Four of twenty lost at setup: the graph is drawn over the sixteen others, but c stays
    ceil(0.1 x 20) = 2, counted over the roster."""
    federation = make_federation(20, seed=6)
    outcome = run_active_round(
        federation, length=200, seed=6, drop={"setup": set(federation.site_ids[:4])}
    )
    assert_matches_plain_sum(outcome)
    parameters = outcome.server.active_parameters
    assert parameters.num_participants == 16 and parameters.corrupt == 2
    assert parameters.threshold == 3


def test_a_round_over_part_of_the_roster_assumes_corrupt_sites_over_all_of_it() -> None:
    """Ten of thirty roster sites sampled: c = ceil(0.1 x 30) = 3, so t = 4 and the floor is
    5, although ten sampled sites alone would give c = 1."""
    federation = make_federation(30, seed=7)
    sampled = federation.site_ids[:10]
    inputs = SiteInputs.random(sampled, length=200, seed=7)
    sites = SiteGroup(federation, inputs, federation.policy())
    server, requests = start_active_round(federation, length=200, sampled=sampled)
    assert server.config.corrupt_sites == 3
    server, requests = server_collect_keys(
        state=server, replies=sites.answer_all("setup", requests)
    )
    assert server.graph is not None and server.graph.threshold == 4
    server, requests = server_route_shares(
        state=server, replies=sites.answer_all("share_keys", requests)
    )
    server, requests = server_collect_masked_inputs(
        state=server, replies=sites.answer_all("masked_input", requests)
    )
    server, requests = server_collect_consistency(
        state=server, replies=sites.answer_all("consistency", requests)
    )
    server, aggregate = server_unmask(state=server, replies=sites.answer_all("unmask", requests))
    assert server.stage == FINISHED and aggregate is not None
    assert aggregate.weight_sum == sum(inputs.weights.values())


def test_the_complete_graph_of_bonawitz_et_al() -> None:
    federation = make_federation(9, seed=8)
    outcome = run_active_round(federation, length=200, seed=8, degree=8)
    assert_matches_plain_sum(outcome)
    assert outcome.server.graph is not None and outcome.server.graph.complete


def test_a_site_that_requires_active_mode_refuses_an_honest_but_curious_round() -> None:
    from tests.secagg_protocol.test_secagg_in_process import run_round

    federation = make_federation(4, seed=9)
    outcome = run_round(num_sites=4, length=50, seed=9, policy=federation.policy())
    assert len(outcome.refusals) == 4
    assert {refusal.code for refusal in outcome.refusals.values()} == {RefusalCode.SECAGG_POLICY}
    assert "requires active-coordinator mode" in str(next(iter(outcome.refusals.values())))


def test_a_site_without_a_roster_refuses_an_active_round() -> None:
    federation = make_federation(4, seed=10)
    inputs = SiteInputs.random(federation.site_ids, length=50, seed=10)
    sites = SiteGroup(None, inputs, ClientSecAggPolicy())
    _, requests = start_active_round(federation, length=50)
    assert not sites.answer_all("setup", requests)
    assert {refusal.code for refusal in sites.refusals.values()} == {RefusalCode.SECAGG_POLICY}


def test_a_site_refuses_a_round_that_assumes_fewer_corrupt_sites_than_it_does() -> None:
    federation = make_federation(10, seed=11)
    cautious = federation.policy(colluding_fraction=0.25)  # 3 of 10, the coordinator says 1
    outcome = run_active_round(federation, length=50, seed=11, policy=cautious)
    assert outcome.server.stage == ABORTED
    assert len(outcome.refusals) == 10
    assert all(r.code == RefusalCode.SECAGG_POLICY for r in outcome.refusals.values())
    assert "assumes 3 of the 10 in the roster" in str(next(iter(outcome.refusals.values())))
    raised = run_active_round(
        federation, length=50, seed=11, policy=cautious, adversarial_rate=0.25
    )
    assert_matches_plain_sum(raised)


def test_a_site_refuses_a_roster_other_than_the_one_it_pinned() -> None:
    federation = make_federation(5, seed=12)
    other = make_federation(5, seed=12)  # same names, other keys: another roster
    outcome = run_active_round(
        federation, length=50, seed=12, policy=other.policy(require_active_coordinator=True)
    )
    assert len(outcome.refusals) == 5
    assert all(r.code == RefusalCode.SECAGG_POLICY for r in outcome.refusals.values())


def test_the_site_state_survives_a_flower_record_round_trip_at_every_stage() -> None:
    records = pytest.importorskip("flwr.app")
    federation = make_federation(6, seed=13)
    inputs = SiteInputs.random(federation.site_ids, length=40, seed=13)
    sites = SiteGroup(federation, inputs, federation.policy())

    def through_records(replies: dict[int, dict]) -> dict[int, dict]:
        for site, state in sites.states.items():
            record = dict(records.ConfigRecord(client_state_to_record(state)))
            restored = client_state_from_record(record)
            assert restored.participant_names == state.participant_names
            assert restored.agreed_survivors == state.agreed_survivors
            assert restored.graph == state.graph
            sites.states[site] = restored
        return {
            site: reply if "masked_input" in reply else dict(records.ConfigRecord(reply))
            for site, reply in replies.items()
        }

    def ask(stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        requests = {site: dict(records.ConfigRecord(request)) for site, request in requests.items()}
        return through_records(sites.answer_all(stage, requests))

    server, requests = start_active_round(federation, length=40)
    server, requests = server_collect_keys(state=server, replies=ask("setup", requests))
    server, requests = server_route_shares(state=server, replies=ask("share_keys", requests))
    server, requests = server_collect_masked_inputs(
        state=server, replies=ask("masked_input", requests)
    )
    server, requests = server_collect_consistency(
        state=server, replies=ask("consistency", requests)
    )
    server, aggregate = server_unmask(state=server, replies=ask("unmask", requests))
    assert server.stage == FINISHED and aggregate is not None, server.abort_reason
    assert aggregate.weight_sum == sum(inputs.weights.values())
    assert not sites.refusals


def test_no_payload_carries_a_secret() -> None:
    """Every field of every request and reply is public: ids, names, public keys, signatures,
    sealed bundles, masked vectors and released shares."""
    federation = make_federation(6, seed=14)
    outcome = run_active_round(federation, length=30, seed=14)
    allowed = {
        "round",
        "stage",
        # setup
        "session_nonce",
        "site_ids",
        "bit_width",
        "update_length",
        "update_clip",
        "max_weight",
        "metric_names",
        "metric_lower",
        "metric_upper",
        "roster_digest",
        "corrupt_sites",
        "dropout_sites",
        "graph_degree",
        "graph_threshold",
        "channel_public_key",
        "mask_public_key",
        "site_name",
        "key_signature",
        # share keys
        "participant_ids",
        "degree",
        "threshold",
        "participant_names",
        "channel_public_keys",
        "mask_public_keys",
        "key_signatures",
        "receiver_ids",
        "sealed_bundles",
        # masked input, consistency, unmask
        "sender_ids",
        "masked_input",
        "survivor_ids",
        "survivor_signature",
        "signer_ids",
        "survivor_signatures",
        "seed_share_site_ids",
        "seed_shares",
        "key_share_site_ids",
        "key_shares",
    }
    for stage in ACTIVE_STAGES:
        for payload in [*outcome.requests[stage].values(), *outcome.replies[stage].values()]:
            assert set(payload) <= allowed, set(payload) - allowed
    masked = next(iter(outcome.masked_inputs.values()))
    assert isinstance(masked, np.ndarray)
