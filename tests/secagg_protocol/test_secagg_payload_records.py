"""Every payload and the site state fit Flower's ConfigRecord/ArrayRecord unchanged."""

import numpy as np
import pytest

from fedmm.client.secagg.stages import (
    client_masked_input,
    client_setup,
    client_share_keys,
    client_state_from_record,
    client_state_to_record,
    client_unmask,
)
from fedmm.server.secagg.stages import (
    FINISHED,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_start_round,
    server_unmask,
)

records = pytest.importorskip("flwr.app")


def _through_config(payload: dict) -> dict:
    return dict(records.ConfigRecord(payload))


def _through_arrays(payload: dict) -> dict:
    arrays = records.ArrayRecord([payload["masked_input"]]).to_numpy_ndarrays()
    return {**payload, "masked_input": arrays[0]}


def test_a_round_through_flower_records() -> None:
    sites = [2**64 - 5, 12, 13, 2**63 + 1]
    server, requests = server_start_round(
        round_id=1,
        site_ids=sites,
        update_length=10,
        update_clip=1.0,
        max_weight=10,
        metric_ranges={"loss": (0.0, 5.0)},
    )
    clients, replies = {}, {}
    for site, request in requests.items():
        clients[site], replies[site] = client_setup(site_id=site, request=_through_config(request))
    server, requests = server_collect_keys(
        state=server, replies={site: _through_config(reply) for site, reply in replies.items()}
    )
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_share_keys(
            state=clients[site], request=_through_config(request)
        )
    server, requests = server_route_shares(
        state=server, replies={site: _through_config(reply) for site, reply in replies.items()}
    )
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_masked_input(
            state=clients[site],
            request=_through_config(request),
            update=np.full(10, 0.1),
            weight=3,
            metrics={"loss": 1.5},
        )
        restored = client_state_from_record(_through_config(client_state_to_record(clients[site])))
        assert restored.held_key_shares == clients[site].held_key_shares
        clients[site] = restored
    server, requests = server_collect_masked_inputs(
        state=server, replies={site: _through_arrays(reply) for site, reply in replies.items()}
    )
    replies = {}
    for site, request in requests.items():
        clients[site], replies[site] = client_unmask(
            state=clients[site], request=_through_config(request)
        )
    server, aggregate = server_unmask(
        state=server, replies={site: _through_config(reply) for site, reply in replies.items()}
    )
    assert server.stage == FINISHED
    assert aggregate is not None
    assert aggregate.weight_sum == 12
    assert np.abs(aggregate.weighted_update_sum - 1.2).max() <= aggregate.update_error_bound
    assert abs(aggregate.metric_sums["loss"] - 6.0) <= aggregate.metric_error_bounds["loss"]
