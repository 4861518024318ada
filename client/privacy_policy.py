"""A site's own privacy policy and how it bounds what the coordinator asks for.

The policy is the site's configuration (node config, or a TOML file it names); nothing in a
coordinator's message can weaken it. The effective setting of a round takes, for each
knob, the more private of the site's limit and the coordinator's request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.client.policy_file import PolicyError, read_policy_file
from fedmm.common.train_request import TrainRequest

#: Node config key: the site's policy file (TOML).
POLICY_FILE = "policy-file"
#: The policy file's table for secure aggregation (``client.secagg.policy``).
SECURE_AGGREGATION_TABLE = "secure-aggregation"
_KEYS = {
    "max-epsilon": "max_epsilon",
    "delta": "delta",
    "min-noise-multiplier": "min_noise_multiplier",
    "max-grad-norm": "max_grad_norm",
    "min-honest-sites": "min_honest_sites",
    "record-count-noise": "record_count_noise",
    "min-reply-seconds": "min_reply_seconds",
    "allow-evaluation": "allow_evaluation",
}
#: Keys whose values are true or false (the others are numbers).
_BOOLEAN_KEYS = frozenset({"allow-evaluation"})
#: The policy's keys, as the ``[privacy]`` table and node config ``privacy-<key>`` name them.
POLICY_KEYS = tuple(_KEYS)

__all__ = ["POLICY_FILE", "POLICY_KEYS", "PolicyError", "SitePrivacyPolicy"]


@dataclass(frozen=True)
class SitePrivacyPolicy:
    """Limits a site sets for itself (record-level DP at this site).

    ``max_epsilon``: the most epsilon this site spends over its ledger's lifetime: every
    run, when the ledger is kept in a file; one run, when it lives in ``context.state``
    (``inf`` allows DP off).
    ``delta``: the largest delta it accepts. ``min_noise_multiplier``: a floor on sigma.
    ``max_grad_norm``: the clipping norm the site insists on (None: the run's value).
    ``min_honest_sites``: distributed DP only: the number h of honest sites whose noise
    shares this site assumes are in every sum (it refuses to unmask a round with fewer
    survivors, and accounts with h shares); 0 accepts the run's ``dp-min-honest-sites``.
    ``record_count_noise``: sigma_c, the standard deviation (in records) of the Gaussian
    noise on the record count the site releases once per run (``client.record_count``);
    charged to the ledger. ``min_reply_seconds``: a training reply leaves no earlier than
    this many seconds after the request arrived (``client.reply_padding``), so that its
    timing does not reveal how much work the site did; 0 (no padding) in simulation.
    ``allow_evaluation``: whether the site evaluates the global model on its held-out
    records when asked (federated evaluation: counts released inside a secure sum only,
    ``client.federated_evaluation``); false refuses every evaluation request with the code
    ``privacy-policy``.
    """

    max_epsilon: float = 3.0
    delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    max_grad_norm: float | None = None
    min_honest_sites: int = 0
    record_count_noise: float = 20.0
    min_reply_seconds: float = 0.0
    allow_evaluation: bool = True

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise PolicyError(
                f"max-epsilon must be > 0 (inf allows DP off), got {self.max_epsilon}"
            )
        if not 0 < self.delta < 1:
            raise PolicyError(f"delta must be in (0, 1), got {self.delta}")
        if self.min_noise_multiplier < 0:
            raise PolicyError(f"min-noise-multiplier must be >= 0, got {self.min_noise_multiplier}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PolicyError(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.min_honest_sites < 0 or int(self.min_honest_sites) != self.min_honest_sites:
            raise PolicyError(
                f"min-honest-sites must be an integer >= 0, got {self.min_honest_sites}"
            )
        if not (math.isfinite(self.record_count_noise) and self.record_count_noise > 0):
            raise PolicyError(
                "record-count-noise must be a finite number of records > 0 (the noise on "
                f"the count this site releases), got {self.record_count_noise}"
            )
        if not (math.isfinite(self.min_reply_seconds) and self.min_reply_seconds >= 0):
            raise PolicyError(
                f"min-reply-seconds must be a finite number >= 0, got {self.min_reply_seconds}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str) -> SitePrivacyPolicy:
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise PolicyError(
                f"{source}: unknown privacy policy key(s) {unknown}; known: {sorted(_KEYS)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in _BOOLEAN_KEYS:
                kwargs[_KEYS[key]] = _boolean(value, key=key, source=source)
                continue
            try:
                if isinstance(value, bool):  # float(True) would pass as 1.0
                    raise TypeError(value)
                kwargs[_KEYS[key]] = float(value)
            except (TypeError, ValueError) as err:
                raise PolicyError(
                    f"{source}: privacy policy '{key}' = {value!r} is not a number"
                ) from err
        if "min_honest_sites" in kwargs:
            honest = kwargs["min_honest_sites"]
            if not math.isfinite(honest) or honest != int(honest):
                raise PolicyError(f"{source}: min-honest-sites = {honest!r} is not an integer")
            kwargs["min_honest_sites"] = int(honest)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> SitePrivacyPolicy:
        """Read ``[privacy]`` (or top-level keys) from a TOML file; its
        ``[secure-aggregation]`` table is the site's secure-aggregation policy
        (``client.secagg.policy``), not read here."""
        document = read_policy_file(path, what="privacy policy file")
        top_level = {k: v for k, v in document.items() if k != SECURE_AGGREGATION_TABLE}
        return cls.from_mapping(document.get("privacy", top_level), source=str(path))

    @classmethod
    def for_site(cls, node_config: Mapping[str, Any]) -> SitePrivacyPolicy:
        """From node config: ``policy-file`` names a file, else ``privacy-*`` keys, else the
        defaults."""
        if POLICY_FILE in node_config:
            return cls.from_file(Path(str(node_config[POLICY_FILE])))
        inline = {
            k.removeprefix("privacy-"): v
            for k, v in node_config.items()
            if k.startswith("privacy-")
        }
        if inline:
            return cls.from_mapping(inline, source="node config")
        return cls()


def _boolean(value: Any, *, key: str, source: str) -> bool:
    """A policy's true/false value (TOML booleans; node config strings true/false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise PolicyError(f"{source}: privacy policy '{key}' = {value!r} is not true or false")


@dataclass(frozen=True)
class EffectivePrivacy:
    """What this site actually uses this run: never weaker than its policy.

    ``epsilon``: what this run may spend (the run's request, never more than the site's
    lifetime cap); ``lifetime_epsilon``: the site's cap over its ledger's life (every run).
    """

    epsilon: float
    delta: float
    noise_multiplier_floor: float
    max_grad_norm: float
    lifetime_epsilon: float = math.inf

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


class PolicyRefusal(Exception):
    """The site will not train under this request; the message says why."""


def effective_privacy(policy: SitePrivacyPolicy, request: TrainRequest) -> EffectivePrivacy:
    """The more private of the site's policy and the request."""
    return EffectivePrivacy(
        epsilon=min(policy.max_epsilon, float(request.epsilon)),
        delta=min(policy.delta, float(request.delta)),
        noise_multiplier_floor=max(
            policy.min_noise_multiplier, float(request.noise_multiplier_floor)
        ),
        max_grad_norm=policy.max_grad_norm or float(request.max_grad_norm),
        lifetime_epsilon=policy.max_epsilon,
    )


def require_delta_below_one_over(count: int, delta: float) -> None:
    """Raise :class:`PolicyRefusal` unless delta < 1/``count`` (the site's public, noisy
    record count: the check itself must not depend on the true count)."""
    if delta >= 1.0 / count:
        raise PolicyRefusal(
            f"delta {delta:g} is not below 1/n = {1.0 / count:g} for this site's noisy "
            f"record count {count}; lower delta in the site policy or the run config"
        )
