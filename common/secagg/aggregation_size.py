"""The fewest sites whose sum may be released: the minimum aggregation size.

Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) reveals the sum over the surviving sites and nothing
else, but a sum over too few sites is itself a leak. Both papers only require at least t
survivors (the Shamir threshold), which protects the masks, not the inputs: with the defaults
for 10 sites t = 2, and a sum over two sites tells each of them, and a coordinator colluding
with either, the other's update exactly. This project adds a floor of its own:

- c sites may collude with the coordinator. They can subtract their own inputs from the sum,
  so the sum hides an honest site's input only when at least two honest inputs remain in it:
  m >= c + 2 for m summed sites.
- A party assumes that at most a fraction gamma of the n sampled sites collude (the same gamma
  as Bell et al.'s parameter analysis, ``neighbour_graph``), so c = ceil(gamma * n), counted
  over the sampled sites because colluders do not drop out.
- Never fewer than three: even with gamma = 0 each site of a two-site sum knows its own input,
  and the released model update is the sum divided by the summed weight.

    minimum aggregation size = max(min_sites, ceil(gamma * n) + 2, h)

where ``min_sites`` >= 3 is the party's own setting and h (distributed DP only) is the number
of honest sites whose noise shares a site assumes in every sum. The coordinator refuses to go
on below it at every stage (also below t); every honest site refuses below its own.
"""

from __future__ import annotations

import math

#: The smallest minimum aggregation size: a sum over two sites reveals each to the other.
MIN_AGGREGATION_SIZE = 3


def colluding_sites(*, fraction: float, num_sampled: int) -> int:
    """c: the sites assumed to collude, ``fraction`` of the sampled ones rounded up."""
    if not 0 <= fraction < 1:
        raise ValueError(f"colluding fraction must be in [0, 1), got {fraction}")
    if num_sampled < 0:
        raise ValueError(f"number of sampled sites must be >= 0, got {num_sampled}")
    # Rounded up: a positive fraction means at least one colluding site.
    return math.ceil(fraction * num_sampled - 1e-9)


def minimum_aggregation_size(
    *, num_sampled: int, colluding_fraction: float, min_sites: int, honest_sites: int = 0
) -> int:
    """The fewest sites a sum over ``num_sampled`` sampled sites may cover (module doc)."""
    if min_sites < 2:
        raise ValueError(f"min_sites must be at least 2, got {min_sites}")
    if honest_sites < 0:
        raise ValueError(f"honest_sites must be >= 0, got {honest_sites}")
    colluding = colluding_sites(fraction=colluding_fraction, num_sampled=num_sampled)
    return max(min_sites, colluding + 2, honest_sites)


def describe_minimum(
    *, num_sampled: int, colluding_fraction: float, min_sites: int, honest_sites: int = 0
) -> str:
    """Which inputs make the minimum, for logs and abort reasons (no secrets here)."""
    colluding = colluding_sites(fraction=colluding_fraction, num_sampled=num_sampled)
    parts = [
        f"min-sites {min_sites}",
        f"ceil({colluding_fraction:g} x {num_sampled} sampled) + 2 = {colluding + 2}",
    ]
    if honest_sites:
        parts.append(f"{honest_sites} honest sites assumed by distributed DP")
    minimum = minimum_aggregation_size(
        num_sampled=num_sampled,
        colluding_fraction=colluding_fraction,
        min_sites=min_sites,
        honest_sites=honest_sites,
    )
    return f"minimum aggregation size {minimum} = max({', '.join(parts)})"
