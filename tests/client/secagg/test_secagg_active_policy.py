"""The site's policy for active-coordinator mode: demand it, pin the roster, and what a bad
value says."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmm.client.policy_file import PolicyError
from fedmm.client.secagg.policy import ClientSecAggPolicy

DIGEST = "ab" * 32


def test_off_by_default() -> None:
    policy = ClientSecAggPolicy()
    assert not policy.require_active_coordinator and policy.pinned_roster_digest is None


def test_the_policy_file_demands_active_mode_and_pins_the_roster(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    spaced = " ".join(DIGEST[i : i + 4] for i in range(0, 64, 4))
    path.write_text(
        "[secure-aggregation]\nrequire-active-coordinator = true\n"
        f'roster-digest = "{spaced}"\ncolluding-fraction = 0.2\n'
    )
    policy = ClientSecAggPolicy.for_site({"policy-file": str(path)})
    assert policy.require_active_coordinator
    assert policy.pinned_roster_digest == bytes.fromhex(DIGEST)
    assert policy.corrupt_sites(12) == 3  # ceil(0.2 x 12) over the roster


def test_node_config_text_sets_the_flag() -> None:
    policy = ClientSecAggPolicy.for_site(
        {"secagg-require-active-coordinator": "true", "secagg-roster-digest": DIGEST}
    )
    assert policy.require_active_coordinator


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"require-active-coordinator": True}, "needs roster-digest: pin the digest"),
        ({"roster-digest": "abc"}, "'abc' is not a roster digest"),
        ({"require-active-coordinator": "yes"}, "'yes' is not true or false"),
        ({"require-active-coordinator": 1}, "is not true or false"),
        ({"roster-digest": 5}, "'roster-digest' = 5 is not a string"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(values: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        ClientSecAggPolicy.from_mapping(values, source="test")


def test_the_site_config_accepts_the_new_keys(tmp_path: Path) -> None:
    from fedmm.client.site_config import load_site_config
    from tests.client.site_fixtures import GOOD

    text = GOOD.replace(
        "[secure-aggregation]\n",
        f'[secure-aggregation]\nrequire-active-coordinator = true\nroster-digest = "{DIGEST}"\n',
    )
    (tmp_path / "privacy-policy.toml").write_text("[privacy]\nmax-epsilon = 2.0\n")
    path = tmp_path / "site.toml"
    path.write_text(text + f'\n[release]\nversion = "0"\ndigest = "{"0" * 64}"\n')
    node_config = load_site_config(path).node_config()
    assert node_config["secagg-require-active-coordinator"] is True
    policy = ClientSecAggPolicy.for_site(node_config)
    assert policy.require_active_coordinator and policy.roster_digest == DIGEST
