"""Site-side stages against hostile and out-of-order requests (the coordinator is real)."""

import dataclasses

import numpy as np
import pytest

from fedmm.client.secagg.stages import (
    ClientSecAggPolicy,
    ClientSecAggState,
    SecAggRefusal,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_state_from_record,
    client_state_to_record,
    client_unmask,
)
from fedmm.server.secagg.stages import (
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_start_round,
)

SITES = [11, 22, 33, 44, 55, 66]
LENGTH = 8
#: Sites that assume no colluders and no dropouts accept a sparse ring over six sites.
TRUSTING = ClientSecAggPolicy(colluding_fraction=0.0, dropout_fraction=0.0)


def _start(degree: int | None = 5, threshold: int | None = 3, sites: list[int] = SITES):
    return server_start_round(
        round_id=2,
        site_ids=sites,
        update_length=LENGTH,
        update_clip=1.0,
        max_weight=100,
        metric_ranges={"loss": (0.0, 10.0)},
        degree=degree,
        threshold=threshold,
    )


def _through_share_keys(policy: ClientSecAggPolicy | None = None, **kwargs: object):
    server, requests = _start(**kwargs)  # type: ignore[arg-type]
    clients: dict[int, ClientSecAggState] = {}
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_setup(site_id=site, request=request, policy=policy)
    server, requests = server_collect_keys(state=server, replies=replies)
    replies = {}
    share_requests = requests
    for site, request in requests.items():
        clients[site], replies[site] = client_share_keys(state=clients[site], request=request)
    server, requests = server_route_shares(state=server, replies=replies)
    return server, clients, share_requests, requests


def _masked(state: ClientSecAggState, request: dict) -> tuple[ClientSecAggState, dict]:
    return client_masked_input(
        state=state, request=request, update=np.zeros(LENGTH), weight=5, metrics={"loss": 1.0}
    )


def _through_masked_input():
    server, clients, _, requests = _through_share_keys()
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = _masked(clients[site], request)
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    return server, clients, requests


def test_setup_makes_fresh_keys_and_advertises_only_public_keys() -> None:
    _, requests = _start()
    first, reply = client_setup(site_id=11, request=requests[11])
    second, _ = client_setup(site_id=11, request=requests[11])
    assert first.mask_private_key != second.mask_private_key
    assert set(reply) == {"round", "stage", "channel_public_key", "mask_public_key"}
    assert first.mask_private_key not in reply.values()
    assert "private" not in repr(first) and first.mask_private_key.hex() not in repr(first)


@pytest.mark.parametrize(
    ("change", "policy", "reason"),
    [
        ({"stage": "unmask"}, ClientSecAggPolicy(), "stage"),
        ({"site_ids": [22, 33, 44, 55, 66, 77]}, ClientSecAggPolicy(), "not among"),
        ({}, ClientSecAggPolicy(min_sites=7), "fewer than this site's minimum aggregation size"),
        ({}, ClientSecAggPolicy(max_update_length=LENGTH - 1), "update length"),
        ({"bit_width": "32"}, ClientSecAggPolicy(), "bit_width"),
    ],
)
def test_setup_refuses_bad_configs(change: dict, policy: ClientSecAggPolicy, reason: str) -> None:
    _, requests = _start()
    with pytest.raises(SecAggRefusal, match=reason):
        client_setup(site_id=11, request=requests[11] | change, policy=policy)


def test_setup_refuses_a_replayed_round() -> None:
    _, requests = _start()
    with pytest.raises(SecAggRefusal, match="replays"):
        client_setup(site_id=11, request=requests[11], previous_round=2)


def test_share_keys_refuses_non_neighbours_duplicates_and_replays() -> None:
    server, requests = _start(degree=2, threshold=2)
    clients, replies = {}, {}
    for site, request in requests.items():
        clients[site], replies[site] = client_setup(site_id=site, request=request, policy=TRUSTING)
    server, requests = server_collect_keys(state=server, replies=replies)
    site = 11
    stranger = next(
        other for other in SITES if other != site and other not in server.graph.neighbours[site]
    )
    request = requests[site]
    hostile = dict(request)
    hostile["site_ids"] = [*request["site_ids"], stranger]
    hostile["channel_public_keys"] = [
        *request["channel_public_keys"],
        replies[stranger]["channel_public_key"],
    ]
    hostile["mask_public_keys"] = [
        *request["mask_public_keys"],
        replies[stranger]["mask_public_key"],
    ]
    with pytest.raises(SecAggRefusal, match="non-neighbours"):
        client_share_keys(state=clients[site], request=hostile)
    duplicated = request | {
        "site_ids": [request["site_ids"][0]] * 2,
        "channel_public_keys": [request["channel_public_keys"][0]] * 2,
        "mask_public_keys": [request["mask_public_keys"][0]] * 2,
    }
    with pytest.raises(SecAggRefusal, match="repeats"):
        client_share_keys(state=clients[site], request=duplicated)
    state, _ = client_share_keys(state=clients[site], request=request)
    with pytest.raises(SecAggRefusal, match="out of order"):
        client_share_keys(state=state, request=request)


def test_share_keys_refuses_a_request_that_leaves_out_a_neighbour() -> None:
    server, requests = _start(degree=2, threshold=2)
    clients, replies = {}, {}
    for site, request in requests.items():
        clients[site], replies[site] = client_setup(site_id=site, request=request, policy=TRUSTING)
    server, requests = server_collect_keys(state=server, replies=replies)
    request = requests[11]
    short = request | {
        "site_ids": request["site_ids"][1:],
        "channel_public_keys": request["channel_public_keys"][1:],
        "mask_public_keys": request["mask_public_keys"][1:],
    }
    with pytest.raises(SecAggRefusal, match="lacks the keys of 1 neighbours"):
        client_share_keys(state=clients[11], request=short)


def test_masked_input_refuses_tampered_foreign_and_replayed_bundles() -> None:
    _, clients, _, requests = _through_share_keys()
    site = 11
    request = requests[site]
    tampered_bundle = bytearray(request["sealed_bundles"][0])
    tampered_bundle[-1] ^= 1
    tampered = request | {
        "sealed_bundles": [bytes(tampered_bundle), *request["sealed_bundles"][1:]]
    }
    with pytest.raises(SecAggRefusal, match="authentication"):
        _masked(clients[site], tampered)
    # A bundle addressed to another site, relabelled as if it came from the same sender.
    other = request["sender_ids"][0]
    redirected = requests[other]["sealed_bundles"][
        requests[other]["sender_ids"].index(
            next(
                s for s in requests[other]["sender_ids"] if s in request["sender_ids"] and s != site
            )
        )
    ]
    swapped = request | {"sealed_bundles": [redirected, *request["sealed_bundles"][1:]]}
    with pytest.raises(SecAggRefusal, match="authentication"):
        _masked(clients[site], swapped)
    duplicated = request | {
        "sender_ids": [other, other],
        "sealed_bundles": request["sealed_bundles"][:1] * 2,
    }
    with pytest.raises(SecAggRefusal, match="repeats"):
        _masked(clients[site], duplicated)
    stale = request | {"round": 1}
    with pytest.raises(SecAggRefusal, match="round 1"):
        _masked(clients[site], stale)
    state, reply = _masked(clients[site], request)
    assert reply["masked_input"].dtype == np.uint32
    with pytest.raises(SecAggRefusal, match="out of order"):
        _masked(state, request)


def test_masked_input_refuses_bundles_from_non_neighbours() -> None:
    server, clients, _, requests = _through_share_keys(TRUSTING, degree=2, threshold=2)
    site = 11
    request = requests[site]
    stranger = next(s for s in SITES if s != site and s not in server.graph.neighbours[site])
    hostile = request | {
        "sender_ids": [*request["sender_ids"], stranger],
        "sealed_bundles": [*request["sealed_bundles"], request["sealed_bundles"][0]],
    }
    with pytest.raises(SecAggRefusal, match="non-neighbours"):
        _masked(clients[site], hostile)


def test_masked_vector_hides_the_weight_and_update() -> None:
    _, clients, _, requests = _through_share_keys()
    _, reply = client_masked_input(
        state=clients[11],
        request=requests[11],
        update=np.full(LENGTH, 0.25),
        weight=7,
        metrics={"loss": 2.0},
    )
    vector = reply["masked_input"]
    assert set(reply) == {"round", "stage", "masked_input"}
    assert int(vector[LENGTH]) != 7
    assert len(np.unique(vector)) == vector.size  # no repeated plain values survive masking


def test_unmask_refuses_a_request_for_both_secrets_of_a_site() -> None:
    _, clients, requests = _through_masked_input()
    site = 11
    request = requests[site]
    neighbour = (
        request["survivor_ids"][0]
        if request["survivor_ids"][0] != site
        else request["survivor_ids"][1]
    )
    both = request | {"dropped_ids": [neighbour]}
    with pytest.raises(SecAggRefusal, match="both secrets"):
        client_unmask(state=clients[site], request=both)
    # Asking afterwards, in a second request, for the other secret is refused too.
    state, reply = client_unmask(state=clients[site], request=request)
    assert neighbour in reply["seed_share_site_ids"]
    second = request | {"survivor_ids": [site], "dropped_ids": [neighbour]}
    with pytest.raises(SecAggRefusal, match="out of order"):
        client_unmask(state=state, request=second)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"num_survivors": 2}, "fewer than this site's minimum aggregation size"),
        ({"num_survivors": 3, "survivor_ids": [11, 22, 33, 44]}, "inconsistent"),
        ({"survivor_ids": [22]}, "survivor"),
        ({"dropped_ids": [11]}, "both secrets|survivor"),
        ({"survivor_ids": [11, 11]}, "repeats"),
        ({"survivor_ids": [11, 999]}, "unknown"),
    ],
)
def test_unmask_refuses_inconsistent_requests(change: dict, reason: str) -> None:
    _, clients, requests = _through_masked_input()
    with pytest.raises(SecAggRefusal, match=reason):
        client_unmask(state=clients[11], request=requests[11] | change)


def test_unmask_reveals_key_shares_only_for_dropped_partners() -> None:
    server, clients, _, requests = _through_share_keys()
    replies = {}
    for site, request in requests.items():
        if site == 66:
            continue
        clients[site], replies[site] = _masked(clients[site], request)
    server, requests = server_collect_masked_inputs(state=server, replies=replies)
    _, reply = client_unmask(state=clients[11], request=requests[11])
    assert reply["key_share_site_ids"] == [66]
    assert 66 not in reply["seed_share_site_ids"]
    hostile = requests[11] | {"dropped_ids": [66, 999]}
    with pytest.raises(SecAggRefusal, match=r"unknown|non-partners"):
        client_unmask(state=clients[11], request=hostile)


def test_state_survives_a_record_round_trip() -> None:
    _, clients, _, _ = _through_share_keys()
    state = clients[11]
    restored = client_state_from_record(client_state_to_record(state))
    assert dataclasses.asdict(restored) == dataclasses.asdict(state)


GARBAGE = [
    None,
    5,
    "x",
    {},
    {"round": 2},
    {"round": "2", "stage": 1},
    {"round": 2**70, "stage": "setup"},
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_requests_are_refused_not_crashed_on(garbage: object) -> None:
    _, clients, _, masked_requests = _through_share_keys()
    with pytest.raises(SecAggRefusal):
        client_setup(site_id=11, request=garbage)  # type: ignore[arg-type]
    with pytest.raises(SecAggRefusal):
        _masked(clients[11], garbage)  # type: ignore[arg-type]
    for field in ["sender_ids", "sealed_bundles"]:
        with pytest.raises(SecAggRefusal):
            _masked(clients[11], masked_requests[11] | {field: garbage})


def test_site_stages_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fedmm.client.secagg.stages, fedmm.server.secagg.stages; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_local_input_that_does_not_fit_the_round_raises_value_error() -> None:
    _, clients, _, requests = _through_share_keys()
    with pytest.raises(ValueError, match="weight"):
        client_masked_input(
            state=clients[11],
            request=requests[11],
            update=np.zeros(LENGTH),
            weight=101,
            metrics={"loss": 1.0},
        )
    with pytest.raises(ValueError, match="entries"):
        client_masked_input(
            state=clients[11],
            request=requests[11],
            update=np.zeros(LENGTH + 1),
            weight=1,
            metrics={"loss": 1.0},
        )
