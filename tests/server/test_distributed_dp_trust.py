"""The default trust assumption of distributed DP is what SecAgg+ already tolerates,
h = n - t + 1, and the noise is calibrated for it: a dropout no longer voids the round, and
fewer than h honest sites (not all n) are needed for the run's epsilon."""

from __future__ import annotations

import pytest

from fedmm.common.federation_config import FederationConfig
from fedmm.common.secagg.neighbour_graph import default_graph_parameters
from fedmm.server.distributed_dp import honest_sites_of, plan_run, secagg_settings
from fedmm.server.secure_aggregation import SecAggSettings

DIMENSION = 49_024


@pytest.mark.parametrize("sites", [3, 5, 10, 20, 50])
def test_default_h_is_n_minus_t_plus_one(sites: int) -> None:
    config = FederationConfig(dp_mode="distributed")
    threshold = default_graph_parameters(sites).threshold
    assert honest_sites_of(config, sites) == sites - threshold + 1 < sites


def test_h_follows_the_runs_threshold_or_its_explicit_setting() -> None:
    assert honest_sites_of(FederationConfig(dp_mode="distributed"), 10) == 9  # t = 2
    assert honest_sites_of(FederationConfig(dp_mode="distributed", secagg_threshold=4), 10) == 7
    assert honest_sites_of(FederationConfig(dp_mode="distributed", dp_min_honest_sites=5), 10) == 5
    assert (
        honest_sites_of(FederationConfig(dp_mode="distributed", dp_min_honest_sites=99), 10) == 10
    )


def test_the_default_plan_is_calibrated_for_h_and_survives_one_dropout() -> None:
    config = FederationConfig(dp_mode="distributed")
    plan = plan_run(config, dimension=DIMENSION, num_sites=10)
    assert plan.min_honest_sites == 9
    assert plan.run_epsilon(9) == pytest.approx(config.epsilon, rel=1e-3)
    # All ten in the sum: 10/9 of the variance needed; any nine honest ones carry it all.
    assert plan.run_epsilon(10) < config.epsilon
    # The coordinator unmasks with nine survivors: one dropout no longer voids the round.
    assert secagg_settings(SecAggSettings(), plan).min_survivors == 9
