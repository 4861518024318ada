"""No sum over too few sites, and no degree or threshold weaker than a site's own policy.

Every stage of sites and coordinator in process, with real cryptography. The coordinator
aborts when the sites left at any stage are fewer than max(t, the minimum aggregation size);
a coordinator that skips that check still gets nothing, because every honest site refuses
below its own minimum (at share keys: the sites that finished setup; at unmask: the
survivors) and refuses a graph weaker than its policy allows. The graph is drawn over the
sites that finished setup.
"""

from __future__ import annotations

import numpy as np

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.common.secagg.neighbour_graph import default_graph_parameters, graph_parameters
from fedmm.common.site_refusal import RefusalCode
from fedmm.server.secagg.stages import ABORTED, FINISHED
from tests.secagg_protocol.test_secagg_in_process import assert_matches_plain_sum, run_round


def _sites(num_sites: int, seed: int) -> list[int]:
    return sorted(run_round(num_sites=num_sites, length=8, seed=seed).server.config.site_ids)


def test_eight_of_ten_sites_lost_at_setup_abort_the_round() -> None:
    """The defaults for 10 sites have t = 2: two survivors would reveal each other."""
    sites = _sites(10, seed=11)
    outcome = run_round(num_sites=10, length=200, seed=11, drop={"setup": set(sites[:8])})
    assert outcome.server.stage == ABORTED and outcome.aggregate is None
    reason = outcome.server.abort_reason or ""
    assert "2 sites advertised keys, fewer than 3" in reason
    assert "minimum aggregation size 3" in reason
    assert not outcome.requests["share_keys"]  # nobody was asked for anything more


def test_the_minimum_grows_with_the_colluding_fraction() -> None:
    """40 sampled sites, 10% colluding: 4 colluders, so at least 6 sites in a sum."""
    sites = _sites(40, seed=12)
    outcome = run_round(num_sites=40, length=50, seed=12, drop={"setup": set(sites[:35])})
    assert "5 sites advertised keys, fewer than 6" in (outcome.server.abort_reason or "")
    outcome = run_round(num_sites=40, length=50, seed=12, drop={"setup": set(sites[:34])})
    assert_matches_plain_sum(outcome)
    assert len(outcome.server.survivor_ids) == 6


def test_the_coordinator_aborts_below_the_minimum_at_the_masked_stage() -> None:
    sites = _sites(10, seed=13)
    outcome = run_round(
        num_sites=10, length=200, seed=13, degree=9, drop={"masked_input": set(sites[:8])}
    )
    assert outcome.server.stage == ABORTED
    assert "round discarded before unmasking" in (outcome.server.abort_reason or "")
    assert not outcome.requests["unmask"]


def test_sites_refuse_to_share_keys_below_their_minimum_when_the_coordinator_does_not_check() -> (
    None
):
    sites = _sites(10, seed=14)
    outcome = run_round(
        num_sites=10,
        length=200,
        seed=14,
        drop={"setup": set(sites[:8])},
        min_sites=2,  # a coordinator that would sum two sites
        adversarial_rate=0.0,
    )
    survivors = set(sites[8:])
    assert set(outcome.requests["share_keys"]) == survivors
    assert set(outcome.refusals) == survivors
    assert all(r.code == RefusalCode.TOO_FEW_SITES for r in outcome.refusals.values())
    assert all("2 sites finished setup" in str(r) for r in outcome.refusals.values())
    assert outcome.aggregate is None


def test_sites_refuse_to_unmask_below_their_minimum_when_the_coordinator_does_not_check() -> None:
    sites = _sites(10, seed=15)
    outcome = run_round(
        num_sites=10,
        length=200,
        seed=15,
        degree=9,
        threshold=2,
        drop={"masked_input": set(sites[:8])},
        min_sites=2,
        adversarial_rate=0.0,
    )
    survivors = set(sites[8:])
    assert set(outcome.requests["unmask"]) == survivors  # the coordinator asked
    assert set(outcome.refusals) == survivors  # and every survivor refused
    assert all(r.code == RefusalCode.TOO_FEW_SITES for r in outcome.refusals.values())
    assert not outcome.replies["unmask"]
    assert outcome.aggregate is None and outcome.server.stage == ABORTED


def test_the_graph_is_drawn_over_the_sites_that_finished_setup() -> None:
    """Five of ten sites lost at setup: the share-keys request names the five others, and the
    degree and threshold are those for five participants (the complete graph, t = 3), not
    those for ten (degree 4, t = 2), so every participant keeps all its neighbours and the
    threshold fits the one colluder that may be among so few."""
    sites = _sites(10, seed=16)
    lost = set(sites[:5])
    outcome = run_round(num_sites=10, length=300, seed=16, drop={"setup": lost})
    assert_matches_plain_sum(outcome)
    participants = [site for site in sites if site not in lost]
    expected = graph_parameters(5, colluding=1, dropouts=1)
    assert (expected.degree, expected.threshold) == (4, 3)
    assert default_graph_parameters(10) != expected  # a graph fixed for the sampled sites
    for site, request in outcome.requests["share_keys"].items():
        assert request["participant_ids"] == participants
        assert (request["degree"], request["threshold"]) == (4, 3)
        assert set(request["site_ids"]) == set(participants) - {site}


def test_every_site_refuses_a_threshold_below_its_policy() -> None:
    """20 sites: the default is degree 8, threshold 3. A coordinator asking for threshold 2
    (a run-config override) would let two colluders rebuild a site's secrets."""
    outcome = run_round(num_sites=20, length=100, seed=17, threshold=2)
    assert outcome.server.graph is not None and outcome.server.graph.degree == 8
    assert len(outcome.refusals) == 20
    assert all(r.code == RefusalCode.SECAGG_POLICY for r in outcome.refusals.values())
    assert all("threshold 2 is below the 3" in str(r) for r in outcome.refusals.values())
    assert outcome.aggregate is None and outcome.server.stage == ABORTED


def test_every_site_refuses_a_degree_whose_graph_may_fall_apart() -> None:
    outcome = run_round(num_sites=20, length=100, seed=18, degree=2, threshold=3)
    assert len(outcome.refusals) == 20
    assert all(r.code == RefusalCode.SECAGG_POLICY for r in outcome.refusals.values())
    assert all("disconnected" in str(r) for r in outcome.refusals.values())
    assert outcome.aggregate is None


def test_every_site_refuses_a_degree_above_its_cap() -> None:
    """The complete graph over 12 sites makes each site mask with 11 neighbours."""
    capped = ClientSecAggPolicy(max_degree=8)
    outcome = run_round(num_sites=12, length=100, seed=19, degree=11, policy=capped)
    assert len(outcome.refusals) == 12
    assert all("max-degree 8" in str(r) for r in outcome.refusals.values())
    accepted = run_round(num_sites=12, length=100, seed=19, policy=capped)  # default degree 6
    assert_matches_plain_sum(accepted)


def test_a_site_assuming_more_colluders_than_the_coordinator_refuses_its_defaults() -> None:
    wary = ClientSecAggPolicy(colluding_fraction=0.3)
    outcome = run_round(num_sites=20, length=100, seed=20, policy=wary)
    assert len(outcome.refusals) == 20
    assert all(r.code == RefusalCode.SECAGG_POLICY for r in outcome.refusals.values())
    # The coordinator that assumes what the sites assume gets their shares.
    agreed = run_round(num_sites=20, length=100, seed=20, policy=wary, adversarial_rate=0.3)
    assert agreed.server.stage == FINISHED
    assert_matches_plain_sum(agreed)


def test_a_sum_the_survivors_cannot_have_sent_is_not_released() -> None:
    """A survivor adds to the weight entry of its masked vector (as if it had encoded a
    weight far above the maximum): every mask comes off, but the weight sum is beyond what
    the survivors can send, so the round is discarded instead of returning it."""
    probe = run_round(num_sites=5, length=50, seed=21)
    cheat = probe.server.config.site_ids[2]
    weight_entry = probe.server.config.update_length

    def inflate_weight(stage: str, site: int, reply: dict) -> dict:
        if stage != "masked_input" or site != cheat:
            return reply
        vector = reply["masked_input"].copy()
        vector[weight_entry] += np.uint32(10**7)
        return reply | {"masked_input": vector}

    outcome = run_round(num_sites=5, length=50, seed=21, alter_reply=inflate_weight)
    assert outcome.aggregate is None and outcome.server.stage == ABORTED
    reason = outcome.server.abort_reason or ""
    assert "decoded sum out of range" in reason and "weight sum" in reason
