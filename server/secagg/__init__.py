"""Coordinator-side stages of SecAgg+ secure aggregation (no Flower, no torch).

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020;
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017. See ``server.secagg.stages``.
"""

from fedmm.server.secagg.stages import (
    CoordinatorGraphRules,
    ServerSecAggState,
    server_collect_consistency,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_start_round,
    server_unmask,
    server_use_advertised_keys,
)

__all__ = [
    "CoordinatorGraphRules",
    "ServerSecAggState",
    "server_collect_consistency",
    "server_collect_keys",
    "server_collect_masked_inputs",
    "server_route_shares",
    "server_start_round",
    "server_unmask",
    "server_use_advertised_keys",
]
