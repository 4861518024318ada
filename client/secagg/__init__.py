"""Site-side stages of SecAgg+ secure aggregation (no Flower, no torch).

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020;
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017. See ``client.secagg.stages``; the site's own limits are in ``client.secagg.policy``
and its minimum aggregation size in ``client.secagg.aggregation_floor``. Active-coordinator
mode: the site's roster signing key (``client.secagg.site_signing_key``), its identity in the
roster (``client.secagg.site_identity``) and the checks of each stage
(``client.secagg.active_checks``).
"""

from fedmm.client.secagg.aggregation_floor import SiteAggregationFloor, TooFewSites
from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.client.secagg.stages import (
    ClientSecAggState,
    client_consistency,
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
    "SiteAggregationFloor",
    "TooFewSites",
    "client_consistency",
    "client_masked_input",
    "client_setup",
    "client_share_keys",
    "client_state_from_record",
    "client_state_to_record",
    "client_unmask",
]
