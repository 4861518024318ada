"""The coordinator's view: with everything it legitimately learns, no single vector unmasks.

A real round (real X25519, HKDF, AES-GCM, AES-CTR and Shamir; no mocks), in which one site's
masked vector arrives too late: the coordinator treats it as dropped and rebuilds its mask
key, but keeps the vector. The coordinator then holds, legitimately:

- every masked vector it received, and the late one;
- from the unmask replies, the self-mask seed of every survivor and the mask private key of
  every dropped site, hence every pairwise seed between a dropped site and its partners;
- the public keys, the graph and the round config.

For each survivor, its vector minus its self mask and minus its pairwise masks with dropped
partners, and for the late site, its vector minus all of its pairwise masks, must still be
uniform over Z_(2^32) and uncorrelated with the site's plain update, also after taking off
any known mask stream any number of times (up to k + 1). If a self-mask seed or a pairwise
seed were predictable (a constant, a seed shared between sites), one of those differences
would be the plain encoded update: then the top bits are far from uniform and the
correlation with the update is close to 1. (Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS 2017, section 4: the double masking that keeps
a late vector hidden; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import chisquare

from fedmm.common.secagg.input_encoding import encode_site_input
from fedmm.common.secagg.mask_expansion import expand_mask
from fedmm.common.secagg.shamir import reconstruct_secret
from fedmm.server.secagg import stages as coordinator
from tests.secagg_protocol.test_secagg_in_process import (
    RoundOutcome,
    assert_matches_plain_sum,
    run_round,
)

LENGTH = 8192
BIT_WIDTH = 32
#: Under uniformity each check fails with probability below 1e-9 (chi-square p-value) or
#: about 2e-9 (|correlation| beyond 6 standard deviations): about 1e-6 for the whole test.
MIN_P_VALUE = 1e-9
MAX_CORRELATION = 6 / np.sqrt(LENGTH)


def _coordinator_secrets(outcome: RoundOutcome) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The self-mask seeds and mask keys the coordinator rebuilds from the unmask replies."""
    server = outcome.server
    assert server.graph is not None
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for holder, reply in outcome.replies["unmask"].items():
        x = server.config.share_x(holder)
        for site, share in zip(reply["seed_share_site_ids"], reply["seed_shares"], strict=True):
            seed_shares.setdefault(site, {})[x] = share
        for site, share in zip(reply["key_share_site_ids"], reply["key_shares"], strict=True):
            key_shares.setdefault(site, {})[x] = share
    threshold = server.graph.threshold
    seeds = {s: reconstruct_secret(shares=v, threshold=threshold) for s, v in seed_shares.items()}
    keys = {s: reconstruct_secret(shares=v, threshold=threshold) for s, v in key_shares.items()}
    return seeds, keys


def _pairwise_seed(outcome: RoundOutcome, mask_key: bytes, own: int, peer: int) -> bytes:
    """A pairwise seed derived as the coordinator's own code derives it when it removes a
    dropped site's masks."""
    config = outcome.server.config
    return coordinator.derive_pairwise_mask_seed(
        own_private_key=mask_key,
        peer_public_key=outcome.server.mask_public_keys[peer],
        round_id=config.round_id,
        session_nonce=config.session_nonce,
        own_id=own,
        peer_id=peer,
    )


def _stream(seed: bytes, length: int) -> np.ndarray:
    return expand_mask(seed=seed, length=length, bit_width=BIT_WIDTH).astype(np.int64)


@dataclass
class CoordinatorView:
    """Each site's masked vector minus the masks the coordinator can compute (int64 mod
    2^32), and every mask seed it knows."""

    residuals: dict[int, np.ndarray]
    known_seeds: list[bytes]


def coordinator_view(outcome: RoundOutcome, late: int) -> CoordinatorView:
    """The residual of every survivor and of the late site, as the coordinator sees it."""
    server = outcome.server
    length = server.config.masked_length
    seeds, keys = _coordinator_secrets(outcome)
    assert set(seeds) == set(server.survivor_ids) and late in keys
    pairwise = {
        (site, partner): _pairwise_seed(outcome, keys[site], site, partner)
        for site in server.dropped_ids
        for partner in server.share_senders[site]
    }
    residuals = {}
    for site in [*server.survivor_ids, late]:
        residual = outcome.masked_inputs[site].astype(np.int64)
        if site in seeds:
            residual = residual - _stream(seeds[site], length)
        for partner in server.share_senders[site]:
            seed = pairwise.get((site, partner)) or pairwise.get((partner, site))
            if seed is None:
                continue  # a surviving partner's pairwise seed: not known to the coordinator
            sign = 1 if site < partner else -1  # what the site added
            residual = residual - sign * _stream(seed, length)
        residuals[site] = residual % (1 << BIT_WIDTH)
    return CoordinatorView(residuals, [*seeds.values(), *pairwise.values()])


def _assert_hidden(residual: np.ndarray, update: np.ndarray, weight: int, what: str) -> None:
    vector = residual[:LENGTH]
    top_bits = vector >> (BIT_WIDTH - 4)
    p_value = chisquare(np.bincount(top_bits, minlength=16)).pvalue
    assert p_value > MIN_P_VALUE, f"{what}: top bits not uniform (p = {p_value:.2e})"
    correlation = np.corrcoef(vector.astype(np.float64), update)[0, 1]
    assert abs(correlation) < MAX_CORRELATION, f"{what}: correlation {correlation:.3f}"
    assert int(residual[LENGTH]) != weight, f"{what}: the weight is in the clear"


@pytest.mark.parametrize(("num_sites", "degree"), [(10, None), (6, 5)])
def test_no_vector_unmasks_with_what_the_coordinator_learns(
    num_sites: int, degree: int | None
) -> None:
    probe = run_round(num_sites=num_sites, length=16, seed=30)
    late = sorted(probe.server.config.site_ids)[3]
    outcome = run_round(
        num_sites=num_sites,
        length=LENGTH,
        seed=30,
        degree=degree,
        late={"masked_input": {late}},
    )
    assert_matches_plain_sum(outcome)
    server = outcome.server
    assert late in server.dropped_ids and late in outcome.masked_inputs  # arrived, but late
    assert server.graph is not None
    view = coordinator_view(outcome, late)
    known = [_stream(seed, server.config.masked_length) for seed in view.known_seeds]
    multipliers = [m for m in range(-(server.graph.degree + 1), server.graph.degree + 2) if m]
    for site, residual in view.residuals.items():
        update, weight = outcome.updates[site], outcome.weights[site]
        role = "late site" if site == late else "survivor"
        _assert_hidden(residual, update, weight, f"{role} {site}")
        for index, stream in enumerate(known):
            for multiplier in multipliers:
                _assert_hidden(
                    (residual - multiplier * stream) % (1 << BIT_WIDTH),
                    update,
                    weight,
                    f"{role} {site} minus {multiplier} x known mask {index}",
                )


def test_the_check_sees_an_unmasked_vector() -> None:
    """The assertion itself: a site's plain encoded input fails it (so the test can fail)."""
    outcome = run_round(num_sites=5, length=LENGTH, seed=31)
    site = outcome.server.survivor_ids[0]
    update, weight = outcome.updates[site], outcome.weights[site]
    encoded = encode_site_input(
        config=outcome.server.config,
        update=update,
        weight=weight,
        metrics={"loss_times_weight": outcome.losses[site] * weight},
        rng=np.random.default_rng(0),
    ).astype(np.int64)
    with pytest.raises(AssertionError, match="not uniform"):
        _assert_hidden(encoded, update, weight, "plain input")
