"""The public neighbour graph of one round, and default degree k and threshold t for n sites.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020) replaces the complete graph of Bonawitz et al. ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017) by a sparse random k-regular graph: a site
agrees pairwise masks with, and secret-shares its seeds among, its k neighbours only, so its
cost grows with k = O(log n) instead of n. With k = n - 1 the graph is complete and the
protocol is that of Bonawitz et al.

Graph: a random Harary graph, as in Bell et al.'s practical variant. The sites are placed on
a ring in a random order and each is joined to the k/2 nearest sites on either side (for odd
k, with an even number of sites, also to the opposite site). The order is the sort of
HMAC-SHA256(seed, site id): deterministic in the public per-round seed, so every party
computes the same graph, and a uniformly random permutation when the seed is random.

Defaults (:func:`default_graph_parameters`) follow Bell et al.'s analysis: the smallest even
k such that, with at most a fraction gamma of sites colluding with the coordinator and a
fraction delta dropping out, (1) the graph of honest survivors stays connected except with
probability 2^-(sigma+1) (a union bound over pairs of gaps of k/2 consecutive bad sites),
and (2) a threshold t exists with Pr[some site has >= t colluding neighbours] <=
2^-(sigma+1) and Pr[some site has < t surviving neighbours] <= 2^-eta (hypergeometric tails
and a union bound over sites); t is the smallest such value. sigma = 40 and eta = 20 as in
the paper. When no k < n - 1 qualifies (small n), the graph is complete and t is a strict
majority of the n share holders, max(2, floor(n / 2) + 1), as recommended by Bonawitz et al.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac

DEFAULT_ADVERSARIAL_RATE = 0.1
DEFAULT_DROPOUT_RATE = 0.2
SECURITY_BITS = 40
CORRECTNESS_BITS = 20


@dataclass(frozen=True)
class GraphParameters:
    """Degree k of the neighbour graph and Shamir threshold t."""

    degree: int
    threshold: int


def neighbour_graph(
    *, site_ids: Sequence[int], degree: int, seed: bytes
) -> dict[int, frozenset[int]]:
    """The neighbours of every site in the random Harary graph of ``degree`` for ``seed``.

    The graph is public (the coordinator and every site derive it from the round config) and
    each stage of a round needs it again, so the last few graphs are cached.
    """
    return dict(_harary_graph(tuple(site_ids), degree, bytes(seed)))


@functools.lru_cache(maxsize=8)
def _harary_graph(
    site_ids: tuple[int, ...], degree: int, seed: bytes
) -> tuple[tuple[int, frozenset[int]], ...]:
    sites = list(site_ids)
    n = len(sites)
    if len(set(sites)) != n:
        raise ValueError("site ids must be distinct")
    if n < 2:
        raise ValueError("a neighbour graph needs at least two sites")
    if not 1 <= degree <= n - 1:
        raise ValueError(f"degree must be in [1, {n - 1}], got {degree}")
    if degree % 2 == 1 and n % 2 == 1 and degree != n - 1:
        raise ValueError("an odd degree needs an even number of sites")
    ring = sorted(sites, key=lambda site: _ring_position_key(seed=seed, site_id=site))
    neighbours: dict[int, set[int]] = {site: set() for site in sites}
    offsets = list(range(1, degree // 2 + 1))
    if degree % 2 == 1:
        offsets.append(n // 2)
    for position, site in enumerate(ring):
        for offset in offsets:
            other = ring[(position + offset) % n]
            neighbours[site].add(other)
            neighbours[other].add(site)
    return tuple((site, frozenset(peers)) for site, peers in neighbours.items())


def _ring_position_key(*, seed: bytes, site_id: int) -> bytes:
    mac = hmac.HMAC(seed, hashes.SHA256())
    mac.update(b"fedmm/secagg+/v1|ring-position|" + str(site_id).encode())
    return mac.finalize()


def default_graph_parameters(
    num_sites: int,
    *,
    adversarial_rate: float = DEFAULT_ADVERSARIAL_RATE,
    dropout_rate: float = DEFAULT_DROPOUT_RATE,
) -> GraphParameters:
    """Degree and threshold for ``num_sites`` sites, following Bell et al. (see module doc)."""
    if num_sites < 2:
        raise ValueError("secure aggregation needs at least two sites")
    if not (0 <= adversarial_rate < 1 and 0 <= dropout_rate < 1):
        raise ValueError("rates must be in [0, 1)")
    if adversarial_rate + dropout_rate > 0.9:
        raise ValueError("adversarial_rate + dropout_rate must not exceed 0.9")
    return graph_parameters(
        num_sites,
        colluding=_rounded_up(adversarial_rate * num_sites),
        dropouts=_rounded_up(dropout_rate * num_sites),
    )


def graph_parameters(num_sites: int, *, colluding: int, dropouts: int) -> GraphParameters:
    """Degree and threshold for a graph over ``num_sites`` sites of which ``colluding`` may
    collude with the coordinator and ``dropouts`` may drop out later (counts, not rates).

    The smallest even k < n - 1 that keeps the honest survivors connected and admits a
    threshold that is both secure and correct (module doc); else the complete graph with a
    strict majority threshold (Bonawitz et al.), raised above ``colluding`` if need be.
    """
    if num_sites < 2:
        raise ValueError("secure aggregation needs at least two sites")
    if colluding < 0 or dropouts < 0:
        raise ValueError("colluding and dropout counts must be >= 0")
    for degree in range(2, num_sites - 1, 2):
        threshold = _threshold_for_degree(
            num_sites=num_sites, degree=degree, colluding=colluding, dropouts=dropouts
        )
        if threshold is not None:
            return GraphParameters(degree=degree, threshold=threshold)
    complete = num_sites - 1
    return GraphParameters(
        degree=complete, threshold=threshold_for_degree(num_sites, complete, colluding=colluding)
    )


def threshold_for_degree(num_sites: int, degree: int, *, colluding: int) -> int:
    """The default threshold for a given degree: :func:`required_threshold`, and for the
    complete graph at least a strict majority of the n share holders (Bonawitz et al.)."""
    secure = required_threshold(num_sites, degree, colluding=colluding)
    if degree < num_sites - 1:
        return secure
    return min(num_sites, max(secure, num_sites // 2 + 1))


def required_threshold(num_sites: int, degree: int, *, colluding: int) -> int:
    """The smallest threshold t >= 2 that keeps a site's secrets from the colluders.

    With ``colluding`` of the ``num_sites`` sites colluding, a site's ``degree`` neighbours
    hold at least t colluders with probability at most 2^-(sigma+1) / n (hypergeometric tail,
    union bound over the sites; Bell et al.). For the complete graph that is colluding + 1:
    with t shares needed, the colluders' shares alone never reach t (Bonawitz et al.).
    """
    if not 1 <= degree <= num_sites - 1:
        raise ValueError(f"degree must be in [1, {num_sites - 1}], got {degree}")
    return max(_likely_colluding_neighbours(num_sites, degree, colluding=colluding) + 1, 2)


def _likely_colluding_neighbours(num_sites: int, degree: int, *, colluding: int) -> int:
    """t1: the fewest colluding neighbours a site exceeds only with negligible probability."""
    colluding = min(max(colluding, 0), num_sites)
    per_site_security = -(SECURITY_BITS + 1) * math.log(2) - math.log(num_sites)
    t1 = 0
    while (
        _log_upper_tail(n=num_sites, marked=colluding, draws=degree, above=t1) > per_site_security
    ):
        t1 += 1
    return t1


def stays_connected(num_sites: int, degree: int, *, removed: int) -> bool:
    """Whether the random Harary graph of ``degree`` stays connected, except with probability
    2^-(sigma+1), after ``removed`` random sites (colluders and dropouts) are taken out. The
    complete graph always does."""
    if not 1 <= degree <= num_sites - 1:
        raise ValueError(f"degree must be in [1, {num_sites - 1}], got {degree}")
    if degree == num_sites - 1:
        return True
    log_security = -(SECURITY_BITS + 1) * math.log(2)
    return _log_prob_disconnected(n=num_sites, degree=degree, bad=removed) < log_security


def _rounded_up(value: float) -> int:
    # A positive rate means at least one colluding (dropped) site.
    return math.ceil(value - 1e-9)


def _threshold_for_degree(
    *, num_sites: int, degree: int, colluding: int, dropouts: int
) -> int | None:
    n = num_sites
    if not stays_connected(n, degree, removed=colluding + dropouts):
        return None
    secure = _likely_colluding_neighbours(n, degree, colluding=colluding) + 1
    per_site_correctness = -CORRECTNESS_BITS * math.log(2) - math.log(n)
    # Correctness: Pr[fewer than t surviving neighbours] is small enough.
    survivors = max(n - dropouts, 0)
    if (
        secure > degree
        or _log_lower_tail(n=n, marked=survivors, draws=degree, below=secure) > per_site_correctness
    ):
        return None
    return max(secure, 2)


def _log_prob_disconnected(*, n: int, degree: int, bad: int) -> float:
    """Union bound on removing ``bad`` random sites disconnecting a random Harary graph."""
    if degree > bad:
        return -math.inf
    log_gap_pairs = math.log(n) + math.log(max(n - degree - 1, 1)) - math.log(2)
    return (
        log_gap_pairs
        + math.lgamma(bad + 1)
        + math.lgamma(n - degree + 1)
        - math.lgamma(n + 1)
        - math.lgamma(bad - degree + 1)
    )


def _log_hypergeometric_pmf(*, n: int, marked: int, draws: int, hits: int) -> float:
    if hits < max(0, draws - (n - marked)) or hits > min(draws, marked):
        return -math.inf
    return (
        _log_binomial(marked, hits)
        + _log_binomial(n - marked, draws - hits)
        - _log_binomial(n, draws)
    )


def _log_binomial(total: int, chosen: int) -> float:
    return math.lgamma(total + 1) - math.lgamma(chosen + 1) - math.lgamma(total - chosen + 1)


def _log_sum(log_values: list[float]) -> float:
    finite = [value for value in log_values if value != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(value - top) for value in finite))


def _log_upper_tail(*, n: int, marked: int, draws: int, above: int) -> float:
    """log Pr[X > above] for X hypergeometric (n, marked, draws)."""
    return _log_sum(
        [
            _log_hypergeometric_pmf(n=n, marked=marked, draws=draws, hits=hits)
            for hits in range(above + 1, draws + 1)
        ]
    )


def _log_lower_tail(*, n: int, marked: int, draws: int, below: int) -> float:
    """log Pr[X < below] for X hypergeometric (n, marked, draws)."""
    return _log_sum(
        [
            _log_hypergeometric_pmf(n=n, marked=marked, draws=draws, hits=hits)
            for hits in range(0, below)
        ]
    )
