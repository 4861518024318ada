"""The site's own secure-aggregation policy, and the checks that hold the coordinator to it.

The coordinator proposes the neighbour graph's degree k and the Shamir threshold t (Bell et
al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020; the
complete graph k = n - 1 is Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017). A site does not take them on trust: for the
actual number of participants it recomputes, from the fraction of colluding and of dropped
sites it assumes itself, what Bell et al.'s analysis requires (``neighbour_graph``), and
refuses (``RefusalCode.SECAGG_POLICY``):

- a threshold below the smallest t that keeps its secrets from the colluders at that degree,
  or below its own ``min-threshold``;
- a degree whose graph would fall apart once the colluders and the dropouts are removed;
- a degree above its ``max-degree`` (each neighbour costs a site one more mask over the whole
  update and one more pair of Shamir shares: the cap bounds what a coordinator can make it
  compute);
- an update longer than its ``max-update-length``.

It also holds the site's minimum aggregation size (``client.secagg.aggregation_floor``).

Active-coordinator mode (Bonawitz et al. section 6; ``common.secagg.active_parameters``):
``require-active-coordinator = true`` makes the site refuse every round that does not run in
that mode, and ``roster-digest`` pins the federation roster (64 hex digits) whose sites it
accepts. In active mode ``colluding-fraction`` is the fraction of the *roster* the site
assumes corrupt: it refuses a round that assumes fewer corrupt sites, c = ceil(gamma N).

Where the policy comes from, in this order (a setting given twice is an error: keep one):

- the ``[secure-aggregation]`` table of the site's policy file, the TOML file named by node
  config ``policy-file``, whose ``[privacy]`` table ``client.privacy_policy`` reads;
- node config keys ``secagg-<key>``;
- the defaults below.

Keys: ``min-sites``, ``min-threshold``, ``colluding-fraction``, ``dropout-fraction``,
``max-degree``, ``max-update-length``, ``require-active-coordinator``, ``roster-digest``. No
torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedmm.client.policy_file import PolicyError, read_policy_file
from fedmm.client.privacy_policy import POLICY_FILE, SECURE_AGGREGATION_TABLE
from fedmm.client.secagg.aggregation_floor import SiteAggregationFloor
from fedmm.client.secagg.refusal import SecAggRefusal
from fedmm.common.secagg.active_parameters import corrupt_sites
from fedmm.common.secagg.aggregation_size import MIN_AGGREGATION_SIZE, colluding_sites
from fedmm.common.secagg.neighbour_graph import (
    DEFAULT_ADVERSARIAL_RATE,
    DEFAULT_DROPOUT_RATE,
    required_threshold,
    stays_connected,
)
from fedmm.common.secagg.roster import RosterError, parse_digest
from fedmm.common.secagg.round_graph import RoundGraph
from fedmm.common.site_refusal import RefusalCode

#: The table of the site's policy file that holds this policy.
POLICY_TABLE = SECURE_AGGREGATION_TABLE
#: Node config keys are ``secagg-<key>``.
NODE_CONFIG_PREFIX = "secagg-"
#: Bell et al.'s default degrees stay below 80 up to 10,000 sites; 100 also admits the
#: complete graph (Bonawitz et al.) up to 101 participants.
DEFAULT_MAX_DEGREE = 100
MAX_UPDATE_LENGTH = 1 << 30


@dataclass(frozen=True)
class ClientSecAggPolicy:
    """Limits a site sets for itself; nothing the coordinator sends can weaken them.

    ``min_sites``: the site's own floor on the sites in a sum (at least 3).
    ``min_threshold``: the lowest Shamir threshold it accepts, whatever the analysis allows.
    ``colluding_fraction``: the fraction of the sampled sites it assumes may collude with
    the coordinator (gamma in Bell et al.). ``dropout_fraction``: the fraction of the sites
    that finished setup it assumes may drop out later (delta).
    ``max_degree``: the most neighbours it accepts. ``max_update_length``: the longest
    update vector it accepts. ``require_active_coordinator``: refuse every round not in
    active-coordinator mode. ``roster_digest``: the pinned roster (64 hex digits; empty:
    none, so no active-mode round).
    """

    min_sites: int = MIN_AGGREGATION_SIZE
    min_threshold: int = 2
    colluding_fraction: float = DEFAULT_ADVERSARIAL_RATE
    dropout_fraction: float = DEFAULT_DROPOUT_RATE
    max_degree: int = DEFAULT_MAX_DEGREE
    max_update_length: int = MAX_UPDATE_LENGTH
    require_active_coordinator: bool = False
    roster_digest: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.min_sites) or self.min_sites < MIN_AGGREGATION_SIZE:
            problems.append(
                f"min-sites = {self.min_sites!r}: use an integer >= {MIN_AGGREGATION_SIZE} "
                "(a sum over two sites reveals each site's update to the other)"
            )
        if not _is_int(self.min_threshold) or self.min_threshold < 2:
            problems.append(f"min-threshold = {self.min_threshold!r}: use an integer >= 2")
        for key, value in (
            ("colluding-fraction", self.colluding_fraction),
            ("dropout-fraction", self.dropout_fraction),
        ):
            if not (_is_number(value) and 0 <= value < 1):
                problems.append(f"{key} = {value!r}: use a number in [0, 1)")
        if (
            _is_number(self.colluding_fraction)
            and _is_number(self.dropout_fraction)
            and not self.colluding_fraction + self.dropout_fraction < 1
        ):
            problems.append(
                "colluding-fraction + dropout-fraction must stay below 1 (some sites must be "
                "honest and stay)"
            )
        if not _is_int(self.max_degree) or self.max_degree < 2:
            problems.append(f"max-degree = {self.max_degree!r}: use an integer >= 2")
        if not _is_int(self.max_update_length) or not 1 <= self.max_update_length <= (
            MAX_UPDATE_LENGTH
        ):
            problems.append(
                f"max-update-length = {self.max_update_length!r}: use an integer in "
                f"[1, {MAX_UPDATE_LENGTH}]"
            )
        if not isinstance(self.require_active_coordinator, bool):
            problems.append(
                f"require-active-coordinator = {self.require_active_coordinator!r}: use true "
                "or false"
            )
        if not isinstance(self.roster_digest, str):
            problems.append(f"roster-digest = {self.roster_digest!r}: use a string")
        elif self.roster_digest:
            try:
                parse_digest(self.roster_digest, source="roster-digest")
            except RosterError as error:
                problems.append(str(error))
        elif self.require_active_coordinator:
            problems.append(
                "require-active-coordinator = true needs roster-digest: pin the digest of the "
                "roster every site signed (64 hex digits)"
            )
        if problems:
            raise PolicyError("secure-aggregation policy: " + "; ".join(problems))

    @property
    def pinned_roster_digest(self) -> bytes | None:
        """The pinned roster digest, or None when this site has not pinned a roster."""
        if not self.roster_digest:
            return None
        return parse_digest(self.roster_digest, source="roster-digest")

    def corrupt_sites(self, roster_size: int) -> int:
        """c for active mode: the sites of an ``roster_size``-site roster this site assumes
        corrupt (its colluding fraction of the roster, rounded up)."""
        return corrupt_sites(fraction=self.colluding_fraction, roster_size=roster_size)

    def floor(self, *, honest_sites: int = 0) -> SiteAggregationFloor:
        """This site's minimum aggregation size; ``honest_sites``: distributed DP's h."""
        return SiteAggregationFloor(
            min_sites=self.min_sites,
            colluding_fraction=self.colluding_fraction,
            honest_sites=honest_sites,
        )

    def require_graph(self, graph: RoundGraph, *, num_sampled: int) -> None:
        """Raise a ``SecAggRefusal`` (``SECAGG_POLICY``) unless ``graph``'s degree and
        threshold meet this policy for its participants (see the module doc)."""
        n = graph.num_participants
        # Colluders are counted over the sampled sites (they do not drop out at setup), and
        # this site is not one of them.
        colluding = min(
            colluding_sites(fraction=self.colluding_fraction, num_sampled=num_sampled), n - 1
        )
        dropouts = math.ceil(self.dropout_fraction * n - 1e-9)
        if graph.degree > self.max_degree:
            raise _policy_refusal(
                f"degree {graph.degree} exceeds this site's max-degree {self.max_degree}"
            )
        needed = max(self.min_threshold, required_threshold(n, graph.degree, colluding=colluding))
        if graph.threshold < needed:
            raise _policy_refusal(
                f"threshold {graph.threshold} is below the {needed} this site requires for "
                f"degree {graph.degree} over {n} sites (min-threshold {self.min_threshold}, "
                f"{colluding} colluding sites assumed)"
            )
        if not stays_connected(n, graph.degree, removed=colluding + dropouts):
            raise _policy_refusal(
                f"degree {graph.degree} over {n} sites may leave the honest survivors "
                f"disconnected once {colluding} colluding and {dropouts} dropped sites are "
                "removed"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str) -> ClientSecAggPolicy:
        """From kebab-case keys (``min-sites``, ...); an unknown key or a value of the wrong
        type is an error naming ``source`` and the key."""
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PolicyError(
                f"{source}: unknown secure-aggregation policy key(s) {unknown}; "
                f"known: {sorted(known)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            kind = type(getattr(cls, known[key]))
            kwargs[known[key]] = _coerce(value, kind, key=key, source=source)
        try:
            return cls(**kwargs)
        except PolicyError as error:
            raise PolicyError(f"{source}: {error}") from None

    @classmethod
    def for_site(cls, node_config: Mapping[str, Any]) -> ClientSecAggPolicy:
        """The site's policy from its policy file's ``[secure-aggregation]`` table and its
        node config keys ``secagg-<key>`` (see the module doc)."""
        known = {f.name.replace("_", "-") for f in fields(cls)}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        path = _policy_file(node_config)
        if path is not None:
            for key, value in _read_table(path).items():
                values[key] = value
                sources[key] = f"{path} [{POLICY_TABLE}] {key}"
        for node_key, value in node_config.items():
            key = str(node_key).removeprefix(NODE_CONFIG_PREFIX)
            if not str(node_key).startswith(NODE_CONFIG_PREFIX) or key not in known:
                continue
            if key in values:
                raise PolicyError(
                    f"secure-aggregation policy '{key}' is set twice, in {sources[key]} and in "
                    f"node config {node_key}: keep one"
                )
            values[key] = value
            sources[key] = f"node config {node_key}"
        source = ", ".join(sorted(set(sources.values()))) or "defaults"
        return cls.from_mapping(values, source=f"secure-aggregation policy ({source})")


#: The policy's keys, as the ``[secure-aggregation]`` table and node config ``secagg-<key>``
#: name them, with the type of each value.
POLICY_KEYS: dict[str, type] = {
    f.name.replace("_", "-"): type(getattr(ClientSecAggPolicy, f.name))
    for f in fields(ClientSecAggPolicy)
}


def _policy_refusal(message: str) -> SecAggRefusal:
    return SecAggRefusal(f"share-keys request refused: {message}", code=RefusalCode.SECAGG_POLICY)


def _policy_file(node_config: Mapping[str, Any]) -> Path | None:
    if POLICY_FILE in node_config:
        return Path(str(node_config[POLICY_FILE]))
    return None


def _read_table(path: Path) -> dict[str, Any]:
    document = read_policy_file(path, what="site policy file")
    table = document.get(POLICY_TABLE, {})
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: {POLICY_TABLE} must be a table ([{POLICY_TABLE}])")
    return table


def _coerce(value: Any, kind: type, *, key: str, source: str) -> Any:
    """An int, float, bool or str setting from TOML or node config (node config values may
    be text)."""
    if kind is str:
        if not isinstance(value, str):
            raise PolicyError(f"{source}: '{key}' = {value!r} is not a string")
        return value
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise PolicyError(f"{source}: '{key}' = {value!r} is not true or false")
        return value
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            expected = "a number" if kind is float else "an integer"
            raise PolicyError(f"{source}: '{key}' = {value!r} is not {expected}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{source}: '{key}' = {value!r} is not a number")
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise PolicyError(f"{source}: '{key}' = {value!r} is not an integer")
        return int(value)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
