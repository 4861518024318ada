"""A site's privacy policy: its own config, never weakened by the coordinator's request."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from fedmm.client.privacy_policy import (
    PolicyError,
    PolicyRefusal,
    SitePrivacyPolicy,
    effective_privacy,
    require_delta_below_one_over,
)
from fedmm.common.federation_config import FederationConfig
from fedmm.common.train_request import TrainRequest


def request(**overrides) -> TrainRequest:
    return TrainRequest.for_round(FederationConfig(**overrides), server_round=1)


def test_stricter_of_policy_and_request_wins_knob_by_knob() -> None:
    policy = SitePrivacyPolicy(
        max_epsilon=3.0, delta=1e-5, min_noise_multiplier=0.5, max_grad_norm=0.7
    )
    asked = request(epsilon=5.0, delta=1e-6, noise_multiplier_floor=0.8, max_grad_norm=1.2)
    effective = effective_privacy(policy, asked)
    assert effective.epsilon == 3.0  # the site's budget, not the looser 5
    assert effective.delta == 1e-6  # the request's, stricter than the site's
    assert effective.noise_multiplier_floor == 0.8
    assert effective.max_grad_norm == 0.7
    assert effective.private

    asked = request(epsilon=1.0, delta=1e-3, noise_multiplier_floor=0.1, max_grad_norm=0.5)
    effective = effective_privacy(policy, asked)
    assert effective.epsilon == 1.0
    assert effective.delta == 1e-5
    assert effective.noise_multiplier_floor == 0.5


def test_site_clipping_norm_wins_and_otherwise_the_request_sets_it() -> None:
    asked = request(max_grad_norm=0.3)
    assert effective_privacy(
        SitePrivacyPolicy(max_grad_norm=2.0), asked
    ).max_grad_norm == pytest.approx(2.0)
    assert effective_privacy(SitePrivacyPolicy(), asked).max_grad_norm == 0.3


def test_coordinator_cannot_turn_dp_off_for_a_site_with_a_finite_budget() -> None:
    asked = request(epsilon=math.inf)
    effective = effective_privacy(SitePrivacyPolicy(max_epsilon=2.0), asked)
    assert effective.private
    assert effective.epsilon == 2.0
    assert effective.delta == 1e-5


def test_dp_is_off_only_when_both_site_and_run_allow_it() -> None:
    open_site = SitePrivacyPolicy(max_epsilon=math.inf)
    assert not effective_privacy(open_site, request(epsilon=math.inf)).private
    assert effective_privacy(open_site, request(epsilon=4.0)).epsilon == 4.0


@pytest.mark.parametrize("delta", [1e-3, 5e-3])
def test_delta_not_below_one_over_n_is_refused(delta: float) -> None:
    effective = effective_privacy(SitePrivacyPolicy(delta=delta), request(delta=0.5))
    with pytest.raises(PolicyRefusal, match="delta") as refusal:
        require_delta_below_one_over(1000, effective.delta)
    assert "noisy record count 1000" in str(refusal.value)
    # Just below 1/n is accepted.
    below = effective_privacy(SitePrivacyPolicy(delta=9.9e-4), request())
    assert below.delta == pytest.approx(1e-5)
    require_delta_below_one_over(1000, below.delta)
    relaxed = effective_privacy(SitePrivacyPolicy(delta=9.9e-4), request(delta=0.1))
    assert relaxed.delta == pytest.approx(9.9e-4)
    require_delta_below_one_over(1000, relaxed.delta)


def test_policy_file_with_privacy_table(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        "[privacy]\n"
        "max-epsilon = 2.5\n"
        "delta = 1e-6\n"
        "min-noise-multiplier = 0.9\n"
        "max-grad-norm = 0.5\n",
        encoding="utf-8",
    )
    assert SitePrivacyPolicy.from_file(path) == SitePrivacyPolicy(
        max_epsilon=2.5, delta=1e-6, min_noise_multiplier=0.9, max_grad_norm=0.5
    )


def test_policy_file_with_top_level_keys_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "open.toml"
    path.write_text("max-epsilon = inf\ndelta = 1e-7\n", encoding="utf-8")
    policy = SitePrivacyPolicy.from_file(path)
    assert policy.max_epsilon == math.inf and policy.delta == 1e-7
    assert policy.min_noise_multiplier == 0.0 and policy.max_grad_norm is None


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[privacy]\nmax-epsilon = 2.0\nmax-epsilion = 9.0\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="max-epsilion"):
        SitePrivacyPolicy.from_file(path)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('max-epsilon = "lots"', "max-epsilon"),
        ("min-noise-multiplier = true", "min-noise-multiplier"),
        ("max-grad-norm = [1.0]", "max-grad-norm"),
        ("delta = 0.5e1", "delta"),
        ("delta = 0.0", "delta"),
        ("max-epsilon = -1.0", "max-epsilon"),
        ("max-epsilon = nan", "max-epsilon"),
        ("min-noise-multiplier = -0.1", "min-noise-multiplier"),
        ("max-grad-norm = 0", "max-grad-norm"),
    ],
)
def test_bad_value_is_an_error_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[privacy]\n{line}\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=key):
        SitePrivacyPolicy.from_file(path)


def test_missing_or_malformed_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        SitePrivacyPolicy.from_file(tmp_path / "nowhere.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[privacy\nmax-epsilon = 1\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="not valid TOML"):
        SitePrivacyPolicy.from_file(broken)


def _policy_file(tmp_path: Path, name: str, epsilon: float) -> Path:
    path = tmp_path / name
    path.write_text(f"[privacy]\nmax-epsilon = {epsilon}\n", encoding="utf-8")
    return path


def test_for_site_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = _policy_file(tmp_path, "named.toml", 4.0)
    inline = {"privacy-max-epsilon": 2.0, "privacy-delta": 1e-6, "partition-id": 3}

    assert SitePrivacyPolicy.for_site({"policy-file": str(named), **inline}).max_epsilon == 4.0
    from_inline = SitePrivacyPolicy.for_site(inline)
    assert (from_inline.max_epsilon, from_inline.delta) == (2.0, 1e-6)
    assert SitePrivacyPolicy.for_site({"partition-id": 3}) == SitePrivacyPolicy()
    # Only the site's own node config names its policy: no environment variable does.
    monkeypatch.setenv("FEDMM_SITE_POLICY", str(_policy_file(tmp_path, "env.toml", 1.0)))
    assert SitePrivacyPolicy.for_site({"partition-id": 3}) == SitePrivacyPolicy()
    assert SitePrivacyPolicy.for_site({}) == SitePrivacyPolicy()


def test_for_site_errors_name_the_source(tmp_path: Path) -> None:
    # Node-config keys are named without their "privacy-" prefix, under "node config".
    with pytest.raises(PolicyError, match=r"node config.*max-epsilon.*three"):
        SitePrivacyPolicy.for_site({"privacy-max-epsilon": "three"})
    with pytest.raises(PolicyError, match=r"node config.*nosie"):
        SitePrivacyPolicy.for_site({"privacy-nosie": 1.0})
    with pytest.raises(PolicyError, match="does not exist"):
        SitePrivacyPolicy.for_site({"policy-file": str(tmp_path / "missing.toml")})
    with pytest.raises(PolicyError, match="also-missing"):
        SitePrivacyPolicy.for_site({"policy-file": str(tmp_path / "also-missing.toml")})


def test_defaults_are_private() -> None:
    policy = SitePrivacyPolicy()
    assert math.isfinite(policy.max_epsilon) and policy.delta < 1e-4
    assert dataclasses.is_dataclass(policy)
    effective = effective_privacy(policy, request(epsilon=math.inf))
    assert effective.private and effective.epsilon == policy.max_epsilon


def test_delta_of_exactly_one_over_n_is_refused() -> None:
    with pytest.raises(PolicyRefusal, match="delta"):
        delta = effective_privacy(SitePrivacyPolicy(), request()).delta
        require_delta_below_one_over(100_000, delta)
