"""The site's floor on the number of sites in a sum it helps to release.

The coordinator reports how many sites are still in the round; an honest site refuses to go
on when that is below its own minimum aggregation size (``common.secagg.aggregation_size``):
at share keys it counts the sites that finished setup (U1), at unmask the survivors whose
inputs are in the sum (U3). Without its seed and key shares the coordinator cannot remove the
masks, so a site's refusal at unmask keeps the round's sum hidden even from a coordinator that
skipped its own check.

One floor for every reason a site needs many sites in a sum: its own ``min-sites``, the
colluding fraction it assumes (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020), and, in distributed DP, the number h of honest sites
whose noise shares it assumes in every sum (Kairouz, Liu, Steinke, ICML 2021). Counts are
as the coordinator reports them: against an honest-but-curious coordinator, the threat model
here, that is enough. No torch here (a deployed site may run the later stages in a freshly
started runner).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.common.secagg.aggregation_size import describe_minimum, minimum_aggregation_size
from fedmm.common.site_refusal import RefusalCode


class TooFewSites(SecAggRefusal):
    """Fewer sites than this site's minimum aggregation size: it will not go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=RefusalCode.TOO_FEW_SITES)


@dataclass(frozen=True)
class SiteAggregationFloor:
    """The fewest sites in a sum this site takes part in (see the module doc)."""

    min_sites: int
    colluding_fraction: float
    honest_sites: int = 0

    def minimum(self, num_sampled: int) -> int:
        """The minimum aggregation size for a round that sampled ``num_sampled`` sites."""
        return minimum_aggregation_size(
            num_sampled=num_sampled,
            colluding_fraction=self.colluding_fraction,
            min_sites=self.min_sites,
            honest_sites=self.honest_sites,
        )

    def require(self, count: int, *, num_sampled: int, what: str) -> None:
        """Raise :class:`TooFewSites` when ``count`` sites (``what``: which ones) are fewer
        than the minimum for ``num_sampled`` sampled sites."""
        if count < self.minimum(num_sampled):
            description = describe_minimum(
                num_sampled=num_sampled,
                colluding_fraction=self.colluding_fraction,
                min_sites=self.min_sites,
                honest_sites=self.honest_sites,
            )
            raise TooFewSites(
                f"{count} {what}, fewer than this site's {description}; refusing to go on"
            )
