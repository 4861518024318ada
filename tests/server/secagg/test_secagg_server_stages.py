"""Coordinator stages against malformed, duplicated and hostile replies (sites are real)."""

import dataclasses
import logging

import numpy as np
import pytest

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.stages import (
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
)
from fedmm.common.secagg.round_graph import RoundGraph
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

SITES = [101, 202, 303, 404, 505]
LENGTH = 16
#: Sites that assume no colluders and no dropouts accept a sparse ring.
TRUSTING = ClientSecAggPolicy(colluding_fraction=0.0, dropout_fraction=0.0)


def _start(threshold: int = 3) -> tuple[ServerSecAggState, dict]:
    return server_start_round(
        round_id=9,
        site_ids=SITES,
        update_length=LENGTH,
        update_clip=1.0,
        max_weight=50,
        degree=4,
        threshold=threshold,
    )


def _setup_replies(requests: dict, policy: ClientSecAggPolicy | None = None) -> tuple[dict, dict]:
    clients, replies = {}, {}
    for site, request in requests.items():
        clients[site], replies[site] = client_setup(site_id=site, request=request, policy=policy)
    return clients, replies


def _run_to_masked(threshold: int = 3):
    server, requests = _start(threshold)
    clients, replies = _setup_replies(requests)
    server, requests = server_collect_keys(state=server, replies=replies)
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_share_keys(state=clients[site], request=request)
    server, requests = server_route_shares(state=server, replies=replies)
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_masked_input(
            state=clients[site], request=request, update=np.full(LENGTH, 0.5), weight=2
        )
    return server, clients, replies


def test_start_round_picks_defaults_and_a_fresh_session() -> None:
    first, requests = server_start_round(
        round_id=1, site_ids=SITES, update_length=4, update_clip=1.0, max_weight=10
    )
    second, _ = server_start_round(
        round_id=1, site_ids=SITES, update_length=4, update_clip=1.0, max_weight=10
    )
    assert first.config.session_nonce != second.config.session_nonce
    assert set(requests) == set(SITES)
    assert requests[101]["stage"] == "setup"
    assert "degree" not in requests[101] and "threshold" not in requests[101]  # fixed later
    _, replies = _setup_replies(requests)
    first, share_requests = server_collect_keys(state=first, replies=replies)
    assert first.graph is not None
    assert (first.graph.degree, first.graph.threshold) == (4, 3)  # five sites: complete graph
    assert share_requests[101]["participant_ids"] == SITES


def test_malformed_and_unexpected_key_replies_are_dropped_with_reasons(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, requests = _start()
    _, replies = _setup_replies(requests)
    hostile = [
        (101, replies[101] | {"mask_public_key": b"short"}),
        (202, replies[202] | {"round": 8}),
        (303, replies[303]),
        (303, replies[303]),  # duplicated
        (404, replies[404] | {"mask_public_key": replies[505]["mask_public_key"]}),  # copied key
        (505, replies[505]),
        (999, replies[505]),  # never asked
        (606, "not a mapping"),
    ]
    with caplog.at_level(logging.WARNING, logger="fedmm.server.secagg.stages"):
        server, out = server_collect_keys(state=server, replies=hostile)
    assert server.stage == ABORTED  # nothing valid is left: 0 < 3
    reasons = "\n".join(server.rejections)
    for expected in ["32 bytes", "round 8", "duplicated", "repeated", "not asked"]:
        assert expected in reasons
    assert out == {}
    assert "aborted" in caplog.text


def test_share_replies_for_the_wrong_receivers_are_dropped() -> None:
    server, requests = _start()
    clients, replies = _setup_replies(requests)
    server, requests = server_collect_keys(state=server, replies=replies)
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_share_keys(state=clients[site], request=request)
    replies[101] = replies[101] | {
        "receiver_ids": replies[101]["receiver_ids"][:-1],
        "sealed_bundles": replies[101]["sealed_bundles"][:-1],
    }
    replies[202] = replies[202] | {"sealed_bundles": [b"x"] * len(replies[202]["sealed_bundles"])}
    server, requests = server_route_shares(state=server, replies=replies)
    assert server.shared_ids == (303, 404, 505)
    assert all(101 not in request["sender_ids"] for request in requests.values())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"masked_input": np.zeros(LENGTH + 1, dtype=np.uint64)}, "dtype"),
        ({"masked_input": np.zeros(LENGTH, dtype=np.uint32)}, "shape"),
        ({"masked_input": [0] * (LENGTH + 1)}, "numpy array"),
        ({"stage": "unmask"}, "stage"),
    ],
)
def test_malformed_masked_inputs_count_as_dropouts(change: dict, reason: str) -> None:
    server, clients, replies = _run_to_masked()
    replies[101] = replies[101] | change
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    assert server.survivor_ids == (202, 303, 404, 505)
    assert server.dropped_ids == (101,)
    assert reason in server.rejections[-1]
    shares = {}
    for site, request in requests.items():
        assert request["dropped_ids"] == [101]
        clients[site], shares[site] = client_unmask(state=clients[site], request=request)
    server, aggregate = server_unmask(state=server, replies=shares)
    assert server.stage == FINISHED
    assert aggregate is not None
    assert aggregate.weight_sum == 8
    assert np.abs(aggregate.weighted_update_sum - 4.0).max() <= aggregate.update_error_bound


def test_out_of_range_entries_are_rejected_for_narrow_rings() -> None:
    server, _ = server_start_round(
        round_id=1, site_ids=SITES, update_length=4, update_clip=1.0, max_weight=10, bit_width=20
    )
    vector = np.zeros(server.config.masked_length, dtype=np.uint32)
    vector[0] = 1 << 20
    # Skip to the masked-input stage with site 101 as the only site that shared keys.
    graph = RoundGraph(
        participant_ids=tuple(SITES),
        degree=4,
        threshold=3,
        session_nonce=server.config.session_nonce,
    )
    server = dataclasses.replace(
        server, stage="awaiting_masked_inputs", graph=graph, share_senders={101: ()}
    )
    server, _ = server_collect_masked_inputs(
        state=server, replies={101: {"round": 1, "stage": "masked_input", "masked_input": vector}}
    )
    assert "outside" in server.rejections[-1]


def test_unmask_replies_with_unrequested_or_tampered_shares_are_dropped() -> None:
    server, clients, replies = _run_to_masked()
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    shares = {}
    for site, request in requests.items():
        clients[site], shares[site] = client_unmask(state=clients[site], request=request)
    # 101 adds a mask-key share for a survivor: dropped, not used.
    shares[101] = shares[101] | {
        "key_share_site_ids": [202],
        "key_shares": [shares[101]["seed_shares"][0]],
    }
    server_after, aggregate = server_unmask(state=server, replies=shares)
    assert aggregate is not None and "not asked" in server_after.rejections[-1]
    # A corrupted share among more than t is detected: the round aborts, nothing is returned.
    corrupted = dict(shares)
    bad = bytearray(shares[202]["seed_shares"][0])
    bad[-1] ^= 1
    corrupted[202] = shares[202] | {"seed_shares": [bytes(bad), *shares[202]["seed_shares"][1:]]}
    server_after, aggregate = server_unmask(state=server, replies=corrupted)
    assert aggregate is None
    assert "inconsistent" in (server_after.abort_reason or "")


def test_stages_called_out_of_order_abort_instead_of_crashing() -> None:
    server, _ = _start()
    server, requests = server_route_shares(state=server, replies={})
    assert server.stage == ABORTED and requests == {}
    server, aggregate = server_unmask(state=server, replies={})
    assert aggregate is None and server.stage == ABORTED


def test_abort_reason_never_contains_secret_material() -> None:
    server, clients, replies = _run_to_masked()
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    shares = {}
    for site, request in requests.items():
        clients[site], shares[site] = client_unmask(state=clients[site], request=request)
    server, aggregate = server_unmask(state=server, replies={101: shares[101], 202: shares[202]})
    assert aggregate is None
    assert "threshold 3" in (server.abort_reason or "")
    for client in clients.values():
        assert client.mask_private_key.hex() not in (server.abort_reason or "")


def test_survivors_split_into_disconnected_groups_abort_before_unmasking() -> None:
    sites = [1, 2, 3, 4, 5, 6]
    server, requests = server_start_round(
        round_id=3,
        site_ids=sites,
        update_length=4,
        update_clip=1.0,
        max_weight=10,
        degree=2,
        threshold=2,
    )
    clients, replies = _setup_replies(requests, policy=TRUSTING)
    server, requests = server_collect_keys(state=server, replies=replies)
    graph = server.graph.neighbours  # a ring of six sites
    first = 1
    opposite = next(
        site
        for site in sites
        if site != first
        and site not in graph[first]
        and not any(site in graph[peer] for peer in graph[first])
    )
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_share_keys(state=clients[site], request=request)
    server, requests = server_route_shares(state=server, replies=replies)
    replies = {}
    for site, request in requests.items():
        if site in (first, opposite):
            continue
        clients[site], replies[site] = client_masked_input(
            state=clients[site], request=request, update=np.zeros(4), weight=1
        )
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    assert requests == {}
    assert "2 disconnected groups" in (server.abort_reason or "")


GARBAGE = [None, 5, "x", b"x", {}, {"round": 9}, {"round": "9", "stage": None}, {"round": 2**70}]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_replies_never_crash_a_stage(garbage: object) -> None:
    server, clients, replies = _run_to_masked()
    replies[101] = garbage  # type: ignore[assignment]
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    assert server.survivor_ids == (202, 303, 404, 505)
    shares = {
        site: client_unmask(state=clients[site], request=request)[1]
        for site, request in requests.items()
    }
    for field in ["seed_share_site_ids", "seed_shares", "key_share_site_ids", "key_shares"]:
        hostile = dict(shares)
        hostile[202] = shares[202] | {field: garbage}
        after, aggregate = server_unmask(state=server, replies=hostile)
        assert aggregate is not None, after.abort_reason
    start, requests = _start()
    _, key_replies = _setup_replies(requests)
    key_replies[101] = garbage  # type: ignore[assignment]
    _, share_requests = server_collect_keys(state=start, replies=key_replies)
    assert 101 not in share_requests and len(share_requests) == 4
