"""Test helpers: a federation with a signed roster, and rounds in active-coordinator mode.

Real Ed25519 roster keys, real X25519, HKDF, AES-GCM, AES-CTR and Shamir; no mocks. The
sites run the real stage functions (``client.secagg.stages``); the coordinator is the real
one (``server.secagg.stages``) unless a test plays a malicious coordinator and builds the
requests itself. ``SiteGroup`` delivers requests to sites and records replies and refusals,
so attack tests can step through a round and intervene between stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.client.secagg.policy import ClientSecAggPolicy
from fedmm.client.secagg.site_identity import SiteIdentity
from fedmm.client.secagg.stages import (
    ClientSecAggState,
    SecAggRefusal,
    client_consistency,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
)
from fedmm.common.secagg.input_encoding import encode_site_input
from fedmm.common.secagg.roster import (
    VerifiedRoster,
    add_site,
    create_roster,
    format_digest,
    sign_roster,
    verify_roster,
)
from fedmm.common.secagg.round_config import SecAggRoundConfig
from fedmm.server.secagg.stages import (
    server_collect_consistency,
    server_collect_keys,
    server_collect_masked_inputs,
    server_route_shares,
    server_start_round,
    server_unmask,
)
from tests.secagg_protocol.test_secagg_in_process import RoundOutcome

METRIC = "loss_times_weight"
Tamper = Callable[[str, int, dict], dict]


@dataclass
class Federation:
    """Sites with node ids, roster names and signing keys, and the roster all of them signed."""

    site_ids: list[int]
    names: dict[int, str]
    keys: dict[int, Ed25519PrivateKey]
    roster: VerifiedRoster

    def identity(self, site: int) -> SiteIdentity:
        return SiteIdentity(name=self.names[site], signing_key=self.keys[site], roster=self.roster)

    def policy(self, **overrides: object) -> ClientSecAggPolicy:
        """The sites' policy: active mode required, this roster pinned."""
        values: dict[str, object] = {
            "require_active_coordinator": True,
            "roster_digest": format_digest(self.roster.digest),
        }
        return ClientSecAggPolicy(**(values | overrides))  # type: ignore[arg-type]


def make_federation(num_sites: int, *, seed: int = 0) -> Federation:
    """``num_sites`` sites with random 64-bit node ids (one above 2^63) and a signed roster."""
    rng = np.random.default_rng(seed)
    site_ids = sorted({int(rng.integers(0, 2**62)) * 2 + 1 for _ in range(num_sites)})
    site_ids[-1] = 2**64 - 5  # Flower node ids can exceed 2^63
    names = {site: f"site-{index:03d}" for index, site in enumerate(site_ids)}
    keys = {site: Ed25519PrivateKey.generate() for site in site_ids}
    roster = create_roster("test-federation")
    for site in site_ids:
        roster = add_site(
            roster, name=names[site], signing_key=keys[site].public_key().public_bytes_raw()
        )
    for site in site_ids:
        roster = sign_roster(roster, private_key=keys[site])
    return Federation(site_ids, names, keys, verify_roster(roster))


@dataclass
class SiteInputs:
    """Each site's plain update, weight and metric, and the seed of its rounding generator
    (so a test can re-encode exactly the vector a site masked)."""

    updates: dict[int, np.ndarray]
    weights: dict[int, int]
    losses: dict[int, float]
    rounding_seed: int

    @classmethod
    def random(cls, site_ids: Iterable[int], *, length: int, seed: int) -> SiteInputs:
        rng = np.random.default_rng(seed)
        sites = list(site_ids)
        return cls(
            updates={site: rng.normal(0.0, 0.6, length) for site in sites},
            weights={site: int(rng.integers(1, 5000)) for site in sites},
            losses={site: float(rng.uniform(0, 3)) for site in sites},
            rounding_seed=seed,
        )

    def rounding(self, site: int) -> np.random.Generator:
        return np.random.default_rng([self.rounding_seed, site % 2**32, site >> 32])

    def metrics(self, site: int) -> dict[str, float]:
        return {METRIC: self.losses[site] * self.weights[site]}

    def encoded(self, config: SecAggRoundConfig, site: int) -> np.ndarray:
        """Exactly the vector ``site`` masked (same stochastic rounding)."""
        return encode_site_input(
            config=config,
            update=self.updates[site],
            weight=self.weights[site],
            metrics=self.metrics(site),
            rng=self.rounding(site),
        )


@dataclass
class SiteGroup:
    """Honest sites running the real stage functions; records replies and refusals."""

    federation: Federation | None
    inputs: SiteInputs
    policy: ClientSecAggPolicy | None = None
    states: dict[int, ClientSecAggState] = field(default_factory=dict)
    refusals: dict[int, SecAggRefusal] = field(default_factory=dict)
    masked_inputs: dict[int, np.ndarray] = field(default_factory=dict)

    def identity(self, site: int) -> SiteIdentity | None:
        return None if self.federation is None else self.federation.identity(site)

    def answer(self, stage: str, site: int, request: dict) -> dict | None:
        """The site's reply to ``request``, or None when it refuses (recorded)."""
        try:
            state, reply = self._run(stage, site, request)
        except SecAggRefusal as refusal:
            self.refusals[site] = refusal
            return None
        self.states[site] = state
        if stage == "masked_input":
            self.masked_inputs[site] = reply["masked_input"]
        return reply

    def answer_all(self, stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        replies = {}
        for site, request in requests.items():
            reply = self.answer(stage, site, request)
            if reply is not None:
                replies[site] = reply
        return replies

    def _run(self, stage: str, site: int, request: dict) -> tuple[ClientSecAggState, dict]:
        identity = self.identity(site)
        if stage == "setup":
            return client_setup(
                site_id=site, request=request, policy=self.policy, identity=identity
            )
        state = self.states[site]
        if stage == "share_keys":
            return client_share_keys(state=state, request=request, identity=identity)
        if stage == "masked_input":
            return client_masked_input(
                state=state,
                request=request,
                update=self.inputs.updates[site],
                weight=self.inputs.weights[site],
                metrics=self.inputs.metrics(site),
                rng=self.inputs.rounding(site),
            )
        if stage == "consistency":
            return client_consistency(state=state, request=request, identity=identity)
        if stage == "unmask":
            return client_unmask(state=state, request=request, identity=identity)
        raise ValueError(stage)


def start_passive_round(
    site_ids: Iterable[int], *, length: int, round_id: int = 5, **round_options: object
):
    """The real coordinator's first stage in the honest-but-curious mode (no roster)."""
    return server_start_round(
        round_id=round_id,
        site_ids=list(site_ids),
        update_length=length,
        update_clip=1.0,
        max_weight=5000,
        metric_ranges={METRIC: (0.0, 15_000.0)},
        **round_options,  # type: ignore[arg-type]
    )


def start_active_round(
    federation: Federation,
    *,
    length: int,
    sampled: Iterable[int] | None = None,
    round_id: int = 5,
    **round_options: object,
):
    """The real coordinator's first stage in active mode, over ``sampled`` (default: all)."""
    return server_start_round(
        round_id=round_id,
        site_ids=list(federation.site_ids if sampled is None else sampled),
        update_length=length,
        update_clip=1.0,
        max_weight=5000,
        metric_ranges={METRIC: (0.0, 15_000.0)},
        roster=federation.roster,
        **round_options,  # type: ignore[arg-type]
    )


def run_active_round(
    federation: Federation,
    *,
    length: int,
    drop: dict[str, set[int]] | None = None,
    tamper: Tamper | None = None,
    policy: ClientSecAggPolicy | None = None,
    seed: int = 0,
    round_id: int = 5,
    **round_options: object,
) -> RoundOutcome:
    """One round in active mode with an honest coordinator; sites in ``drop[stage]`` never
    answer that stage, ``tamper`` changes a request on its way to a site."""
    drop = drop or {}
    inputs = SiteInputs.random(federation.site_ids, length=length, seed=seed)
    sites = SiteGroup(federation, inputs, policy or federation.policy())
    sent: dict[str, dict[int, dict]] = {}
    answered: dict[str, dict[int, dict]] = {}

    def deliver(stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        sent[stage] = requests
        kept = {
            site: (request if tamper is None else tamper(stage, site, request))
            for site, request in requests.items()
            if site not in drop.get(stage, set())
        }
        answered[stage] = sites.answer_all(stage, kept)
        return answered[stage]

    server, requests = start_active_round(
        federation, length=length, round_id=round_id, **round_options
    )
    server, requests = server_collect_keys(state=server, replies=deliver("setup", requests))
    server, requests = server_route_shares(state=server, replies=deliver("share_keys", requests))
    server, requests = server_collect_masked_inputs(
        state=server, replies=deliver("masked_input", requests)
    )
    server, requests = server_collect_consistency(
        state=server, replies=deliver("consistency", requests)
    )
    server, aggregate = server_unmask(state=server, replies=deliver("unmask", requests))
    return RoundOutcome(
        server,
        aggregate,
        inputs.updates,
        inputs.weights,
        inputs.losses,
        sites.refusals,
        sites.masked_inputs,
        sent,
        answered,
    )
