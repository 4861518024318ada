"""The site's secure-aggregation policy: where it comes from, what a bad value says, and the
degree and threshold it refuses (recomputed by the site for the actual participants)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmm.client.policy_file import PolicyError
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.common.secagg.round_graph import RoundGraph
from fedmm.common.site_refusal import RefusalCode
from tests.client.site_fixtures import GOOD, make_site


def _graph(participants: int, degree: int, threshold: int) -> RoundGraph:
    return RoundGraph(
        participant_ids=tuple(range(participants)),
        degree=degree,
        threshold=threshold,
        session_nonce=os.urandom(32),
    )


def test_defaults_without_any_setting() -> None:
    policy = ClientSecAggPolicy.for_site({})
    assert policy == ClientSecAggPolicy()
    assert (policy.min_sites, policy.colluding_fraction, policy.dropout_fraction) == (3, 0.1, 0.2)
    assert policy.floor().minimum(10) == 3


def test_node_config_keys_set_the_policy() -> None:
    policy = ClientSecAggPolicy.for_site(
        {
            "secagg-min-sites": 5,
            "secagg-min-threshold": "3",  # --node-config may hand over text
            "secagg-colluding-fraction": 0.2,
            "secagg-max-degree": 12,
            "secagg-spill-dir": "/tmp",  # not a policy key
        }
    )
    assert (policy.min_sites, policy.min_threshold, policy.max_degree) == (5, 3, 12)
    assert policy.colluding_fraction == 0.2


def test_the_policy_file_holds_both_tables(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[privacy]\nmax-epsilon = 2.0\ndelta = 1e-6\n\n"
        "[secure-aggregation]\nmin-sites = 4\ndropout-fraction = 0.3\n"
    )
    node_config = {"policy-file": str(path), "secagg-max-degree": 20}
    secagg = ClientSecAggPolicy.for_site(node_config)
    assert (secagg.min_sites, secagg.dropout_fraction, secagg.max_degree) == (4, 0.3, 20)
    privacy = SitePrivacyPolicy.for_site(node_config)
    assert (privacy.max_epsilon, privacy.delta) == (2.0, 1e-6)
    # Top-level privacy keys, as before, next to the secure-aggregation table.
    path.write_text("max-epsilon = 1.5\n\n[secure-aggregation]\nmin-sites = 6\n")
    assert SitePrivacyPolicy.from_file(path).max_epsilon == 1.5
    assert ClientSecAggPolicy.for_site({"policy-file": str(path)}).min_sites == 6


def test_the_simulation_policy_file_is_read_from_each_sites_node_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmm.simulations.simulated_sites import SimulatedSiteNodeConfig

    path = tmp_path / "site-policy.toml"
    path.write_text("[privacy]\nmax-epsilon = 3.0\n\n[secure-aggregation]\nmin-sites = 7\n")
    node_config = SimulatedSiteNodeConfig(out_dir=str(tmp_path)).node_config(3)
    assert ClientSecAggPolicy.for_site(node_config).min_sites == 7
    # Nothing outside the site's node config names its policy.
    monkeypatch.setenv("FEDMM_SITE_POLICY", str(path))
    assert ClientSecAggPolicy.for_site({}) == ClientSecAggPolicy()


def test_a_deployed_site_config_feeds_the_policy(tmp_path: Path) -> None:
    from fedmm.client.site_config import check_site_config

    config = check_site_config(make_site(tmp_path / "site", GOOD))
    policy = ClientSecAggPolicy.for_site(config.node_config())
    assert (policy.min_sites, policy.min_threshold) == (3, 3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"min-sites": 2}, "min-sites = 2: use an integer >= 3"),
        ({"min-threshold": 1}, "min-threshold = 1: use an integer >= 2"),
        ({"colluding-fraction": 1.0}, r"colluding-fraction = 1.0: use a number in \[0, 1\)"),
        ({"dropout-fraction": -0.1}, "dropout-fraction"),
        ({"colluding-fraction": 0.5, "dropout-fraction": 0.5}, "must stay below 1"),
        ({"max-degree": 1}, "max-degree = 1: use an integer >= 2"),
        ({"max-update-length": 0}, "max-update-length"),
        ({"min-sites": 3.5}, "'min-sites' = 3.5 is not an integer"),
        ({"min-sites": "many"}, "'min-sites' = 'many' is not an integer"),
        ({"min-sites": True}, "not a number"),
        ({"min-site": 3}, r"unknown secure-aggregation policy key\(s\) \['min-site'\]"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(values: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        ClientSecAggPolicy.from_mapping(values, source="test")


def test_a_setting_given_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[secure-aggregation]\nmin-sites = 4\n")
    with pytest.raises(PolicyError, match=r"set twice.*secagg-min-sites: keep one"):
        ClientSecAggPolicy.for_site({"policy-file": str(path), "secagg-min-sites": 5})


def test_a_bad_policy_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[secure-aggregation]\nmin-sites = 2\n")
    with pytest.raises(PolicyError, match=f"{path}.*min-sites = 2"):
        ClientSecAggPolicy.for_site({"policy-file": str(path)})
    with pytest.raises(PolicyError, match="does not exist"):
        ClientSecAggPolicy.for_site({"policy-file": str(tmp_path / "missing.toml")})
    path.write_text("secure-aggregation = 3\n")
    with pytest.raises(PolicyError, match=r"must be a table"):
        ClientSecAggPolicy.for_site({"policy-file": str(path)})


@pytest.mark.parametrize(
    ("graph", "sampled", "policy", "message"),
    [
        ((20, 8, 2), 20, ClientSecAggPolicy(), "threshold 2 is below the 3"),
        ((20, 8, 3), 20, ClientSecAggPolicy(min_threshold=5), "threshold 3 is below the 5"),
        ((20, 2, 3), 20, ClientSecAggPolicy(), "disconnected"),
        ((12, 11, 7), 12, ClientSecAggPolicy(max_degree=10), "exceeds this site's max-degree"),
        # Colluders are counted over the 40 sampled sites (4), not the 10 that set up (1).
        ((10, 9, 4), 40, ClientSecAggPolicy(), "threshold 4 is below the 5"),
    ],
)
def test_weak_graphs_are_refused(
    graph: tuple[int, int, int], sampled: int, policy: ClientSecAggPolicy, message: str
) -> None:
    with pytest.raises(SecAggRefusal, match=message) as refused:
        policy.require_graph(_graph(*graph), num_sampled=sampled)
    assert refused.value.code == RefusalCode.SECAGG_POLICY


def test_sound_graphs_are_accepted() -> None:
    ClientSecAggPolicy().require_graph(_graph(20, 8, 3), num_sampled=20)
    ClientSecAggPolicy().require_graph(_graph(10, 9, 5), num_sampled=40)
    ClientSecAggPolicy(max_degree=11).require_graph(_graph(12, 11, 7), num_sampled=12)
