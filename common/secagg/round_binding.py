"""What a derived key and a sealed share bundle are bound to in active-coordinator mode.

In the honest-but-curious mode, HKDF's ``info`` and AES-GCM's associated data name the round,
the session and the pair of site ids (``key_agreement``, ``share_cipher``). In active mode
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, section 6; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) they also carry a *pair binding*: SHA-256 over

- the round's parameter digest (``SecAggRoundConfig.digest``: round, session, sampled sites,
  roster, ring, ranges, corrupt and dropout counts),
- the digest of the graph the site derived (``RoundGraph.digest``: participants, their
  signed keys through the seed, degree and threshold), and
- both sites' ids and the two public keys used (channel keys for the share channel, mask keys
  for pairwise masks), in id order.

A key or ciphertext made under one view of the round is then useless under any other: two
sites shown different participant lists or graphs cannot open each other's shares, and a
site is the partner only of sites that see exactly its round. This is what lets a site count
its partners as sites of its own round (``active_parameters``).
"""

from __future__ import annotations

import hashlib

from fedmm.common.secagg.key_agreement import PROTOCOL_LABEL


def session_digest(*, parameters_digest: bytes, graph_digest: bytes) -> bytes:
    """The round as one site sees it after share keys: parameters and graph."""
    return hashlib.sha256(PROTOCOL_LABEL + b"|session|" + parameters_digest + graph_digest).digest()


def pair_binding(
    *,
    session: bytes,
    purpose: str,
    site_a: int,
    public_key_a: bytes,
    site_b: int,
    public_key_b: bytes,
) -> bytes:
    """The binding of one pair's key (or one bundle) to the session and both public keys;
    the same whichever site computes it."""
    (low, low_key), (high, high_key) = sorted(((site_a, public_key_a), (site_b, public_key_b)))
    return hashlib.sha256(
        b"|".join(
            [
                PROTOCOL_LABEL,
                b"pair-binding",
                purpose.encode(),
                session.hex().encode(),
                f"{low}".encode() + b"=" + low_key.hex().encode(),
                f"{high}".encode() + b"=" + high_key.hex().encode(),
            ]
        )
    ).digest()
