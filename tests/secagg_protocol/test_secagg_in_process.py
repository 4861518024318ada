"""The whole SecAgg+ round in process: every stage of sites and coordinator, no Flower.

Checks that the unmasked sum equals the plain weighted sum within the stated quantisation
bound (2 to 50 sites, up to 1M entries), that dropouts at every stage are tolerated while at
least t sites remain and abort the round cleanly below t, and that hostile traffic (tampered
ciphertexts, replays) turns the affected site into a dropout instead of corrupting the sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.stages import (
    ClientSecAggState,
    SecAggRefusal,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
)
from fedmm.common.secagg.input_encoding import DecodedAggregate
from fedmm.server.secagg.stages import (
    ABORTED,
    FINISHED,
    ServerSecAggState,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_start_round,
    server_unmask,
)

STAGES = ("setup", "share_keys", "masked_input", "unmask")
Tamper = Callable[[str, int, dict], dict]


@dataclass
class RoundOutcome:
    server: ServerSecAggState
    aggregate: DecodedAggregate | None
    updates: dict[int, np.ndarray]
    weights: dict[int, int]
    losses: dict[int, float]
    refusals: dict[int, SecAggRefusal]
    masked_inputs: dict[int, np.ndarray]
    requests: dict[str, dict[int, dict]]
    replies: dict[str, dict[int, dict]]

    def plain_weighted_sum(self, sites: tuple[int, ...]) -> np.ndarray:
        return sum(self.weights[site] * np.clip(self.updates[site], -1.0, 1.0) for site in sites)


def run_round(
    *,
    num_sites: int,
    length: int,
    drop: dict[str, set[int]] | None = None,
    late: dict[str, set[int]] | None = None,
    tamper: Tamper | None = None,
    alter_reply: Tamper | None = None,
    policy: ClientSecAggPolicy | None = None,
    seed: int = 0,
    **round_options: object,
) -> RoundOutcome:
    """Run one round; sites in ``drop[stage]`` never answer that stage's request, sites in
    ``late[stage]`` answer it too late (their reply is recorded but never delivered).
    ``tamper`` changes a request on its way to a site, ``alter_reply`` a reply on its way
    back. ``policy``: every site's own secure-aggregation policy (default: the defaults)."""
    drop = drop or {}
    late = late or {}
    rng = np.random.default_rng(seed)
    site_ids = sorted({int(rng.integers(0, 2**62)) * 2 + 1 for _ in range(num_sites)})
    site_ids[0] = 2**64 - 5  # Flower node ids can exceed 2^63
    updates = {site: rng.normal(0.0, 0.6, length) for site in site_ids}
    weights = {site: int(rng.integers(1, 5000)) for site in site_ids}
    losses = {site: float(rng.uniform(0, 3)) for site in site_ids}
    refusals: dict[int, SecAggRefusal] = {}
    masked_inputs: dict[int, np.ndarray] = {}
    clients: dict[int, ClientSecAggState] = {}
    sent: dict[str, dict[int, dict]] = {}
    answered: dict[str, dict[int, dict]] = {}

    def deliver(stage: str, requests: dict[int, dict], answer: Callable) -> dict[int, dict]:
        replies = {}
        sent[stage] = requests
        for site, request in requests.items():
            if site in drop.get(stage, set()):
                continue
            if tamper is not None:
                request = tamper(stage, site, request)
            try:
                clients[site], replies[site] = answer(site, request)
            except SecAggRefusal as refusal:
                refusals[site] = refusal
                continue
            if alter_reply is not None:
                replies[site] = alter_reply(stage, site, replies[site])
        answered[stage] = replies
        return {site: reply for site, reply in replies.items() if site not in late.get(stage, ())}

    server, requests = server_start_round(
        round_id=5,
        site_ids=site_ids,
        update_length=length,
        update_clip=1.0,
        max_weight=5000,
        metric_ranges={"loss_times_weight": (0.0, 15_000.0)},
        **round_options,  # type: ignore[arg-type]
    )
    replies = deliver(
        "setup", requests, lambda s, r: client_setup(site_id=s, request=r, policy=policy)
    )
    server, requests = server_collect_keys(state=server, replies=replies)
    replies = deliver(
        "share_keys", requests, lambda s, r: client_share_keys(state=clients[s], request=r)
    )
    server, requests = server_route_shares(state=server, replies=replies)

    def masked(site: int, request: dict) -> tuple[ClientSecAggState, dict]:
        state, reply = client_masked_input(
            state=clients[site],
            request=request,
            update=updates[site],
            weight=weights[site],
            metrics={"loss_times_weight": losses[site] * weights[site]},
        )
        masked_inputs[site] = reply["masked_input"]
        return state, reply

    replies = deliver("masked_input", requests, masked)
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    replies = deliver("unmask", requests, lambda s, r: client_unmask(state=clients[s], request=r))
    server, aggregate = server_unmask(state=server, replies=replies)
    return RoundOutcome(
        server, aggregate, updates, weights, losses, refusals, masked_inputs, sent, answered
    )


def assert_matches_plain_sum(outcome: RoundOutcome) -> None:
    assert outcome.server.stage == FINISHED, outcome.server.abort_reason
    aggregate = outcome.aggregate
    assert aggregate is not None
    survivors = outcome.server.survivor_ids
    assert aggregate.num_summed == len(survivors)
    error = np.abs(aggregate.weighted_update_sum - outcome.plain_weighted_sum(survivors))
    assert error.max() <= aggregate.update_error_bound
    assert aggregate.weight_sum == sum(outcome.weights[site] for site in survivors)
    loss_sum = sum(outcome.losses[site] * outcome.weights[site] for site in survivors)
    assert (
        abs(aggregate.metric_sums["loss_times_weight"] - loss_sum)
        <= (aggregate.metric_error_bounds["loss_times_weight"])
    )


@pytest.mark.parametrize("num_sites", [3, 4, 7, 10, 20, 33, 50])
def test_masked_sum_equals_plain_weighted_sum(num_sites: int) -> None:
    outcome = run_round(num_sites=num_sites, length=2000, seed=num_sites)
    assert_matches_plain_sum(outcome)
    assert len(outcome.server.survivor_ids) == num_sites


def test_complete_graph_of_bonawitz_et_al() -> None:
    outcome = run_round(num_sites=12, length=500, degree=11, threshold=7, seed=1)
    assert_matches_plain_sum(outcome)


@pytest.mark.parametrize("num_sites", [5, 50])
def test_one_million_entries(num_sites: int) -> None:
    start = time.perf_counter()
    outcome = run_round(num_sites=num_sites, length=1_000_000, seed=num_sites)
    elapsed = time.perf_counter() - start
    assert_matches_plain_sum(outcome)
    assert elapsed < 30 * num_sites / 5


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_down_to_the_threshold_are_tolerated(stage: str) -> None:
    # Complete graph on 10 sites, t = 6: four dropouts leave exactly t.
    outcome = run_round(num_sites=10, length=300, degree=9, threshold=6, seed=3, drop={})
    dropped = set(sorted(outcome.server.config.site_ids)[:4])
    outcome = run_round(
        num_sites=10, length=300, degree=9, threshold=6, seed=3, drop={stage: dropped}
    )
    assert_matches_plain_sum(outcome)
    if stage == "unmask":  # their masked inputs arrived: they are in the sum
        assert len(outcome.server.survivor_ids) == 10
    else:
        assert set(outcome.server.survivor_ids).isdisjoint(dropped)


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_below_the_threshold_abort_cleanly(stage: str) -> None:
    outcome = run_round(num_sites=10, length=300, degree=9, threshold=6, seed=3)
    dropped = set(sorted(outcome.server.config.site_ids)[:5])
    outcome = run_round(
        num_sites=10, length=300, degree=9, threshold=6, seed=3, drop={stage: dropped}
    )
    assert outcome.server.stage == ABORTED
    assert outcome.aggregate is None
    assert "threshold 6" in (outcome.server.abort_reason or "")
    assert outcome.server.masked_sum is None


def test_dropouts_at_every_stage_of_one_sparse_round() -> None:
    # 40 sites with the default sparse graph; a few sites lost at each stage.
    probe = run_round(num_sites=40, length=1000, seed=8)
    assert probe.server.graph.degree < 39  # SecAgg+, not the complete graph
    sites = sorted(probe.server.config.site_ids)
    drop = {
        "setup": {sites[0]},
        "share_keys": {sites[5]},
        "masked_input": {sites[10], sites[11]},
        "unmask": {sites[20]},
    }
    outcome = run_round(num_sites=40, length=1000, seed=8, drop=drop)
    assert_matches_plain_sum(outcome)
    assert outcome.server.dropped_ids == (sites[10], sites[11])
    assert len(outcome.server.survivor_ids) == 36


def test_tampered_ciphertext_turns_the_receiver_into_a_dropout() -> None:
    probe = run_round(num_sites=8, length=200, seed=4)
    victim = sorted(probe.server.config.site_ids)[2]

    def flip_a_bit(stage: str, site: int, request: dict) -> dict:
        if stage != "masked_input" or site != victim:
            return request
        bundle = bytearray(request["sealed_bundles"][0])
        bundle[30] ^= 0x80
        return request | {"sealed_bundles": [bytes(bundle), *request["sealed_bundles"][1:]]}

    outcome = run_round(num_sites=8, length=200, seed=4, tamper=flip_a_bit)
    assert "authentication" in str(outcome.refusals[victim])
    assert victim in outcome.server.dropped_ids
    assert_matches_plain_sum(outcome)


def test_request_for_both_secrets_is_refused_and_the_sum_stays_hidden() -> None:
    probe = run_round(num_sites=6, length=200, seed=6, degree=5, threshold=4)
    target = sorted(probe.server.config.site_ids)[1]

    def ask_for_both(stage: str, site: int, request: dict) -> dict:
        if stage == "unmask" and target in request["survivor_ids"] and site != target:
            return request | {"dropped_ids": [*request["dropped_ids"], target]}
        return request

    outcome = run_round(num_sites=6, length=200, seed=6, degree=5, threshold=4, tamper=ask_for_both)
    assert all("both secrets" in str(outcome.refusals[site]) for site in outcome.refusals)
    assert len(outcome.refusals) == 5
    assert outcome.aggregate is None and outcome.server.stage == ABORTED


def test_masked_inputs_do_not_correlate_with_plain_updates() -> None:
    outcome = run_round(num_sites=6, length=50_000, seed=9)
    assert_matches_plain_sum(outcome)
    for site, masked in outcome.masked_inputs.items():
        as_float = masked[: outcome.updates[site].size].astype(np.float64)
        correlation = np.corrcoef(as_float, outcome.updates[site])[0, 1]
        assert abs(correlation) < 0.03
        # Uniform in Z_(2^32): mean and spread of a uniform variable.
        assert abs(as_float.mean() / 2**32 - 0.5) < 0.01
        assert int(masked[-2]) != outcome.weights[site]  # the weight entry is masked too


def test_every_round_uses_fresh_keys_and_sessions() -> None:
    first = run_round(num_sites=4, length=50, seed=2)
    second = run_round(num_sites=4, length=50, seed=2)
    assert first.server.config.session_nonce != second.server.config.session_nonce
    assert set(first.server.mask_public_keys.values()).isdisjoint(
        second.server.mask_public_keys.values()
    )
    assert not np.array_equal(
        first.masked_inputs[first.server.survivor_ids[0]],
        second.masked_inputs[second.server.survivor_ids[0]],
    )
