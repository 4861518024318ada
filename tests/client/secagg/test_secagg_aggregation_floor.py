"""One site-side floor: the site's min-sites, the colluding fraction it assumes, and
distributed DP's h, against the counts the coordinator reports."""

import pytest

from fedmm.client.secagg.aggregation_floor import SiteAggregationFloor, TooFewSites
from fedmm.common.site_refusal import RefusalCode


def test_the_floor_takes_the_largest_input() -> None:
    floor = SiteAggregationFloor(min_sites=3, colluding_fraction=0.1)
    assert floor.minimum(10) == 3 and floor.minimum(40) == 6
    assert (
        SiteAggregationFloor(min_sites=3, colluding_fraction=0.1, honest_sites=8).minimum(10) == 8
    )


def test_below_the_floor_the_site_refuses_with_a_code_only_the_log_explains() -> None:
    floor = SiteAggregationFloor(min_sites=3, colluding_fraction=0.1, honest_sites=5)
    floor.require(5, num_sampled=10, what="sites survived")
    with pytest.raises(TooFewSites) as refused:
        floor.require(4, num_sampled=10, what="sites survived")
    assert refused.value.code == RefusalCode.TOO_FEW_SITES
    assert refused.value.refusal().code == RefusalCode.TOO_FEW_SITES
    assert "4 sites survived, fewer than this site's minimum aggregation size 5" in str(
        refused.value
    )
    assert "5 honest sites assumed by distributed DP" in str(refused.value)
