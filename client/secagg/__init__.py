"""Site-side stages of SecAgg+ secure aggregation (no Flower, no torch).

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020;
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017. See ``client.secagg.stages``.
"""

from client.secagg.stages import (
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

__all__ = [
    "ClientSecAggPolicy",
    "ClientSecAggState",
    "SecAggRefusal",
    "client_masked_input",
    "client_setup",
    "client_share_keys",
    "client_state_from_record",
    "client_state_to_record",
    "client_unmask",
]
