"""The seed of the neighbour graph in active-coordinator mode: a hash of the signed round keys.

In SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020) the neighbour graph is public randomness. In the honest-but-curious mode the
coordinator's session nonce seeds it (``round_graph``): an active coordinator could pick the
nonce, offline and at leisure, so that the sites it wants end up around the site it targets.
In active mode the seed is instead SHA-256 over the round's parameter digest and every
participant's node id, roster name and two round public keys, in the order of the node ids.
Every site recomputes it from the signed keys it verified (``round_signatures``) and refuses a
graph drawn from anything else.

What the coordinator can still influence, and why it does not matter here:

- **Which sites count as set up (U1).** Dropping any one site's keys changes the seed, so a
  coordinator that receives n0 setup replies can try up to 2^n0 subsets (fewer: each must
  keep at least the minimum aggregation size, ``active_parameters``).
- **The keys of corrupt sites.** A corrupt site can make fresh key pairs and sign them after
  the coordinator has seen the honest sites' keys, as often as it likes.

So the seed resists choice (the coordinator cannot name a graph, and cannot compute the
graph before the honest sites' fresh keys arrive), but not grinding: a coordinator with
colluders can evaluate many candidate graphs within a round. That is why no property of the
active mode relies on the graph being random: the Shamir threshold t = c + 1 keeps the c
corrupt sites below t shares of any secret in *any* graph, and the dropout allowance and
partner count keep at least two honest inputs in every group the coordinator can separate in
*any* graph (``active_parameters``). Grinding can only make a round fail (too few partners),
which a malicious coordinator can always do anyway. Preventing grinding outright would need a
commit-then-reveal exchange before share keys, one more round trip than the single added
consistency exchange.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from fedmm.common.secagg.key_agreement import PROTOCOL_LABEL


def graph_seed(
    *,
    parameters_digest: bytes,
    participant_ids: tuple[int, ...],
    names: Mapping[int, str],
    channel_public_keys: Mapping[int, bytes],
    mask_public_keys: Mapping[int, bytes],
) -> bytes:
    """The 32-byte seed of the ring order: SHA-256 over the parameter digest and, for every
    participant in node-id order, its id, roster name and two round public keys."""
    digest = hashlib.sha256()
    digest.update(PROTOCOL_LABEL + b"|graph-seed|" + parameters_digest)
    for site in sorted(participant_ids):
        name = names[site].encode()
        digest.update(site.to_bytes(8, "big"))
        digest.update(len(name).to_bytes(1, "big") + name)
        digest.update(channel_public_keys[site] + mask_public_keys[site])
    return digest.digest()
