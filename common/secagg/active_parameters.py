"""Degree, thresholds and dropout allowance of a round against an actively malicious coordinator.

Bonawitz et al. ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, section 6) make their protocol secure against a server that lies, for fewer than
n/3 corrupted clients and a threshold t > 2n/3: every honest client signs the survivor set it
is told of and unmasks only once t clients signed the same set, and two different sets cannot
both collect t signatures when the corrupted clients are too few. Bell et al. ("Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) carry the consistency
check over to sparse graphs. This module fixes the numbers for this project, with c the
corrupt sites assumed:

- **c = ceil(gamma N)**, counted over the N sites of the *roster*, not over the sampled
  sites: a malicious coordinator samples as it likes and can put every corrupt site into
  every round.
- **Shamir threshold t = c + 1** (or more, never less). c corrupt holders never hold t shares
  of one secret, *whatever the graph*, so no choice of graph (see ``graph_seed`` on what the
  coordinator can still influence) lets the colluders rebuild a site's secrets. Bell et al.'s
  probabilistic thresholds (``neighbour_graph``) assume a graph drawn at random, which an
  active coordinator can bias; this bound does not.
- **Consistency threshold t_cc = floor((n1 + c) / 2) + 1** signatures, from survivors, over
  the same survivor set, with n1 the sites that finished setup. Honest sites sign one set
  each, so two different sets would need 2 (t_cc - c) <= n1 - c honest signers: impossible.
  (Bonawitz et al.'s t > 2n/3 for c < n/3 is this bound at its worst case.) All honest sites
  that unmask therefore agree on the survivors, and each reveals, for every site, the shares
  of one of its two secrets only.
- **Dropout allowance D = min(d, floor((k - c - 1) / 2))**: a site masks its input only when
  at least k - D of its k neighbours sent it shares (its *partners*), and signs a survivor
  set only when at most D of the n1 participants are missing from it. A site's partners then
  hold at least k - D - c honest sites, more than the D the coordinator may call dropped, so
  at least k - 2D - c >= 1 honest partners survive: their pairwise masks stay secret, and the
  coordinator can never strip a site's input out of the sum alone (declaring honest
  neighbours dropped is how an active server would isolate a site in a sparse graph). Every
  group of inputs it can separate holds at least k - 2D - c + 1 >= 2 honest sites.
- **Degree k = c + 1 + 2d** by default (the smallest with D = d and t = c + 1 <= k), made even
  when n1 is odd, and the complete graph (Bonawitz et al.) when that reaches n1 - 1. With t,
  D and n1 fixed, every holder of a site's shares that survives answers: reconstruction
  needs t <= k - D + 1, which always holds here.
- **Minimum aggregation size max(min-sites, c + 2, h)**: as in ``aggregation_size``, with c
  counted over the roster.

The price: k grows with c and d, that is with the federation size (O(N) neighbours, not
O(log N)): meant for cross-silo federations of tens to a few hundred sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmm.common.secagg.aggregation_size import MIN_AGGREGATION_SIZE


@dataclass(frozen=True)
class ActiveGraphParameters:
    """The graph and thresholds of one active-mode round over ``num_participants`` sites."""

    num_participants: int
    corrupt: int
    degree: int
    threshold: int
    dropout_allowance: int
    consistency_threshold: int

    @property
    def complete(self) -> bool:
        return self.degree == self.num_participants - 1

    @property
    def required_partners(self) -> int:
        """The fewest neighbours whose shares a site needs before it masks its input."""
        return self.degree - self.dropout_allowance

    @property
    def min_honest_group(self) -> int:
        """The fewest honest inputs in any group of inputs the coordinator can separate."""
        return self.degree - 2 * self.dropout_allowance - self.corrupt + 1


def corrupt_sites(*, fraction: float, roster_size: int) -> int:
    """c: the corrupt sites assumed, ``fraction`` of the roster rounded up."""
    if not 0 <= fraction < 1:
        raise ValueError(f"corrupt fraction must be in [0, 1), got {fraction}")
    if roster_size < 1:
        raise ValueError(f"roster size must be at least 1, got {roster_size}")
    return math.ceil(fraction * roster_size - 1e-9)


def dropout_sites(*, fraction: float, num_sampled: int) -> int:
    """d: the sites the round lets drop out after setup, ``fraction`` of the sampled ones."""
    if not 0 <= fraction < 1:
        raise ValueError(f"dropout fraction must be in [0, 1), got {fraction}")
    return math.ceil(fraction * num_sampled - 1e-9)


def minimum_active_aggregation_size(
    *, corrupt: int, min_sites: int = MIN_AGGREGATION_SIZE, honest_sites: int = 0
) -> int:
    """The fewest sites in a sum: two honest inputs beyond the c corrupt ones (module doc)."""
    if corrupt < 0:
        raise ValueError(f"corrupt sites must be >= 0, got {corrupt}")
    return max(min_sites, corrupt + 2, honest_sites, MIN_AGGREGATION_SIZE)


def consistency_threshold(num_participants: int, *, corrupt: int) -> int:
    """t_cc: signatures over one survivor set that no second set can also collect."""
    return (num_participants + corrupt) // 2 + 1


def active_graph_parameters(
    num_participants: int,
    *,
    corrupt: int,
    dropouts: int,
    degree: int = 0,
    threshold: int = 0,
) -> ActiveGraphParameters:
    """The round's graph for ``num_participants`` sites that finished setup, ``corrupt``
    assumed corrupt sites and ``dropouts`` allowed later dropouts; ``degree`` and
    ``threshold`` are overrides (0: the defaults of the module doc; a degree of n1 - 1 or
    more is the complete graph). Raises ``ValueError`` when no safe graph exists: fewer than
    c + 2 participants, or an override below what c requires."""
    n = num_participants
    if corrupt < 0 or dropouts < 0:
        raise ValueError("corrupt and dropout counts must be >= 0")
    if n < corrupt + 2 or n < MIN_AGGREGATION_SIZE:
        raise ValueError(
            f"{n} participants cannot hide an honest input from {corrupt} corrupt sites "
            f"(at least {max(corrupt + 2, MIN_AGGREGATION_SIZE)} needed)"
        )
    if degree and degree < corrupt + 1:
        raise ValueError(f"degree {degree} is below c + 1 = {corrupt + 1}")
    wanted = degree if degree else corrupt + 1 + 2 * dropouts
    k = min(max(wanted, 2), n - 1)
    if k % 2 == 1 and n % 2 == 1 and k < n - 1:
        k += 1  # a Harary graph of odd degree needs an even number of sites
    allowance = max(0, min(dropouts, (k - corrupt - 1) // 2))
    t = max(corrupt + 1, 2)
    if threshold:
        if threshold < t:
            raise ValueError(f"threshold {threshold} is below c + 1 = {t}")
        t = threshold
    if t > k - allowance + 1:
        raise ValueError(
            f"threshold {t} exceeds the {k - allowance + 1} shares that survive when "
            f"{allowance} sites drop out (degree {k})"
        )
    return ActiveGraphParameters(
        num_participants=n,
        corrupt=corrupt,
        degree=k,
        threshold=t,
        dropout_allowance=allowance,
        consistency_threshold=consistency_threshold(n, corrupt=corrupt),
    )
